//! Authenticated mail (`mail-auth`): DKIM signatures put on relayed mail at accept
//! (`sign`), and SPF, DKIM and DMARC checked on mail for local users, stamped in one
//! `Authentication-Results:` header (`check`). DNS goes through the configured resolver
//! (`dns_nameservers`) like the rest of erlmail. This layer decides and computes; the
//! session actor applies the outcome (a signature prepended, a 550, the Junk mailbox).

pub mod check;
pub mod sign;
