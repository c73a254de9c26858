//! protocol (to be written).
