//! queue (to be written).
