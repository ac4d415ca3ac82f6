//! Weir's core: configuration, lake locations, EU residency, time parsing, identifiers, and the
//! integer key sets that merges look rows up in.
//!
//! Nothing here reads the environment or the file system on its own: the binary reads
//! `weir.toml` and the environment once, at the edge, and hands the values in.

pub mod config;
pub mod ident;
pub mod intkeys;
pub mod lake;
pub mod time;

pub use config::{Config, ConfigError, S3Settings, ServeSettings, ServeUser};
pub use ident::{IdentError, validate_slug};
pub use intkeys::{IntMap, IntSet};
pub use lake::{EU_REGIONS, LakeError, LakeLocation, check_eu_region, is_eu_region, parse_bucket_location};
pub use time::{TimeError, parse_date, parse_timestamp};
