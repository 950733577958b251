//! Typed Lacewing proxy configuration.
//!
//! [`model`] is the shape of the YAML file (and of `/config_dump`); [`load`]
//! parses and validates it, naming file, line and field in every error;
//! [`units`] holds the duration and size notations used in the file.

pub mod model;
pub mod units;

pub use model::*;
