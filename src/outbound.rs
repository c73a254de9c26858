//! outbound (to be written).
