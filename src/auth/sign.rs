//! DKIM signing of relayed mail (placeholder: being written).
