//! SPF, DKIM and DMARC checks of incoming mail (placeholder: being written).
