//! The library half of the `fastvm` binary: the parts that other crates test
//! directly (the fuzz targets of `crates/fastvm-fuzz`). Everything else lives
//! in the binary's modules (`main.rs`).

pub mod untar;
