//! End-to-end tests against a real PostgreSQL 15 cluster and the real in-repo S3 server.
//! One test binary (link time is the scarce resource); modules by area.

mod backfill;
mod cdc;
mod cli;
mod common;
mod derive;
mod dv;
mod fdw;
mod flight;
mod generator;
mod interop;
mod lakecheck;
mod legacy;
mod ml;
mod services;
mod store;
