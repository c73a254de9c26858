//! actors (to be written).
