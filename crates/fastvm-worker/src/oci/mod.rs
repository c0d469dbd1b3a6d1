//! OCI images: registry pulls ([`registry`]) and layer unpacking ([`layer`]),
//! the first half of an image import (`runtime/imports.rs`).
pub mod layer;
pub mod registry;
