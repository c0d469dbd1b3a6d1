//! The API reference: `GET /docs`, a page that renders this server's OpenAPI
//! document (`GET /openapi.json`, the same as the committed
//! `openapi/fastvm.json`) with Redoc, and Redoc's script at a versioned path
//! under `/docs/`. Both are public, like `/openapi.json`.
//!
//! Redoc's standalone bundle is vendored from npm with its licence
//! (`assets/docs/vendor/`, `scripts/vendor-redoc`) and served from the binary:
//! the page loads nothing from anywhere else, and its Content-Security-Policy
//! says so.

use axum::http::{header, HeaderValue};
use axum::response::Response;

/// The vendored Redoc (see `assets/docs/vendor/VERSIONS`).
pub const REDOC_VERSION: &str = "3.0.1";
/// Where the page loads Redoc from: versioned, so it can be cached for long.
pub const REDOC_JS_PATH: &str = "/docs/redoc-3.0.1/redoc.standalone.js";

const PAGE_HTML: &[u8] = include_bytes!("../../assets/docs/index.html");
const REDOC_JS: &[u8] = include_bytes!("../../assets/docs/vendor/redoc.standalone.js");

/// Only this server's own scripts, fetching only from this server.
/// Redoc (styled-components) styles the page with `<style>` elements it
/// creates, hence `'unsafe-inline'` for styles (never for scripts); its search
/// index runs in a Web Worker made from a `blob:` URL, hence `worker-src blob:`;
/// its logo and icons are `data:` images.
const CSP: &str = "default-src 'none'; script-src 'self'; worker-src blob:; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /docs`: the rendered API reference.
pub async fn page() -> Response {
    let mut res = super::static_asset(PAGE_HTML, "text/html; charset=utf-8", "no-cache");
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// `GET /docs/redoc-<version>/redoc.standalone.js`: Redoc, cached for a year
/// (a new version is a new path).
pub async fn redoc_js() -> Response {
    super::static_asset(
        REDOC_JS,
        "text/javascript; charset=utf-8",
        "public, max-age=31536000, immutable",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_the_served_redoc_and_the_served_document() {
        let html = std::str::from_utf8(PAGE_HTML).expect("the page is UTF-8");
        assert!(
            html.contains(&format!("src=\"{REDOC_JS_PATH}\"")),
            "assets/docs/index.html must load Redoc from {REDOC_JS_PATH}"
        );
        assert!(REDOC_JS_PATH.contains(&format!("redoc-{REDOC_VERSION}/")));
        assert!(html.contains("spec-url=\"/openapi.json\""));
        let versions = include_str!("../../assets/docs/vendor/VERSIONS");
        assert!(
            versions.starts_with(&format!("redoc {REDOC_VERSION} ")),
            "assets/docs/vendor/VERSIONS and REDOC_VERSION disagree: {versions}"
        );
        let head = std::str::from_utf8(&REDOC_JS[..200]).unwrap_or_default();
        assert!(
            head.contains(&format!("Version: {REDOC_VERSION}")),
            "{head}"
        );
        // Nothing but this server.
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}
