//! Weir's PostgreSQL adapter: connections with readable errors, and the COPY BINARY format.

pub mod conn;
pub mod copy;
pub mod decode;
pub mod pgoutput;
pub mod raw;
pub mod types;

pub use conn::{PgError, connect, describe_url};
pub use copy::{CopyBinaryWriter, PG_EPOCH_DAYS, PG_EPOCH_MICROS, copy_in, copy_in_stream};
pub use decode::{CopyDecoder, DecodeError, decode_numeric};
pub use raw::RawConnection;
pub use types::{PgColumn, PgType, TypeError, arrow_schema};
