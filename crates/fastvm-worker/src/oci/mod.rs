//! OCI images: registry pulls ([`registry`]), layer unpacking ([`layer`]),
//! image archives between the host and a builder VM ([`archive`]) and the
//! images a Dockerfile names ([`dockerfile`]), the layer cache's cap
//! ([`cache`]): the first half of an import
//! (`runtime/imports.rs`, `runtime/builds.rs`).
pub mod archive;
pub mod cache;
pub mod dockerfile;
pub mod layer;
pub mod registry;
