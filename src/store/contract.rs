//! The contract suite every `MessageStore` backend must pass.
