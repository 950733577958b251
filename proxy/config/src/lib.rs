//! Typed Lacewing proxy configuration.
//!
//! [`model`] is the shape of the YAML file (and of `/config_dump`); [`load`]
//! parses and validates it, naming file, line and field in every error;
//! [`quickstart`] builds a configuration from the `lacewing proxy` flags;
//! [`units`] holds the duration and size notations used in the file.

pub mod error;
pub mod lines;
pub mod load;
pub mod model;
pub mod quickstart;
pub mod rules;
pub mod units;

pub use error::{ConfigError, ConfigIssue};
pub use load::{from_file, from_yaml_str, validate};
pub use model::*;
pub use quickstart::{QuickStart, WasmFlag, parse_cluster_flag};
