//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! annotations and the types crate's schemas. Served at `GET /openapi.json`
//! and committed at `openapi/fastvm.json`; the test below fails when the two
//! drift. Regenerate the committed file with
//! `FASTVM_UPDATE_OPENAPI=1 cargo test -p fastvm-server openapi`.
//!
//! Every operation has a summary, a description, and an example of its JSON
//! request body and of its 2xx JSON answers (from [`examples`]): the API
//! reference `GET /docs` renders them, and a test below enforces it.

pub mod examples;

use crate::routes::{admin, console, exec, files, health, me, org, services, snapshots, vms};
use std::sync::OnceLock;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fast VM API",
        description = "Self-hostable microVM platform: launch VMs, run commands in them, pause and resume them, snapshot and restore them.\n\nAuthenticate with `Authorization: Bearer <api key>`. Every error answers `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        health::healthz,
        vms::list,
        vms::launch,
        vms::get,
        vms::update,
        vms::delete,
        vms::pause,
        vms::resume,
        crate::routes::fork::fork,
        vms::refresh_ttl,
        vms::set_firewall,
        vms::patch_firewall,
        exec::exec,
        files::presign,
        files::fetch,
        files::export,
        services::list,
        services::register,
        services::update,
        services::delete,
        crate::routes::bucket_mounts::list,
        crate::routes::bucket_mounts::attach,
        crate::routes::bucket_mounts::get_one,
        crate::routes::bucket_mounts::rotate,
        crate::routes::bucket_mounts::delete,
        crate::routes::volumes::list,
        crate::routes::volumes::create,
        crate::routes::volumes::get_one,
        crate::routes::volumes::update,
        crate::routes::volumes::delete,
        crate::routes::volumes::attachments,
        crate::routes::volumes::attach,
        crate::routes::volumes::detach,
        snapshots::list,
        snapshots::create,
        snapshots::get,
        snapshots::update,
        snapshots::delete,
        crate::routes::snapshot_imports::list,
        crate::routes::snapshot_imports::create,
        crate::routes::snapshot_imports::presign_context,
        crate::routes::snapshot_imports::get,
        crate::routes::snapshot_imports::logs,
        crate::routes::snapshot_imports::delete,
        crate::routes::snapshot_imports::cancel,
        org::quotas,
        console::console_token,
        console::open_vm_console,
        me::list_ssh_keys,
        me::add_ssh_key,
        me::delete_ssh_key,
        me::ssh_gateway,
        admin::list_workers,
        admin::drain_worker
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "health", description = "Liveness"),
        (name = "vms", description = "VM lifecycle and exec"),
        (name = "services", description = "HTTP services of a VM, exposed by the proxy (`fastvm serve --proxy-listen`) at `<name>--<vmIdHex>.proxy.<domain>`: HTTP/1.1, WebSocket, Server-Sent Events and h2c (gRPC) pass through; a request for a paused VM resumes it"),
        (name = "snapshots", description = "Snapshots of VMs (memory, device state and disk); restore one with POST /v1/vms {snapshotId}"),
        (name = "snapshot-imports", description = "Snapshots built from OCI images: pulled, unpacked into a root disk, booted once and captured (Dockerfile builds: not yet)"),
        (name = "files", description = "File transfer through the staging store. `/files/export` is an extension of this server (the spec's download flow needs guest network; export does not)"),
        (name = "bucket-mounts", description = "Customer S3 and GCS buckets mounted in running VMs; the worker signs the bucket requests, credentials never enter the guest"),
        (name = "volumes", description = "Managed volumes: files that outlive VMs, attached to running VMs at /mnt/... or /data/... and shared between them"),
        (name = "org", description = "The caller's org: quotas and usage"),
        (name = "admin", description = "Operator endpoints (extension), admin key only: the worker hosts of a cluster"),
        (name = "me", description = "The calling user: SSH public keys for the SSH gateway (`fastvm serve --ssh-listen`, `ssh -p 2222 <vm-id>@<host>`)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An API key (`fvm_...`), created at first start or with `fastvm keys create`.".into(),
        );
        components.add_security_scheme("bearerAuth", SecurityScheme::Http(scheme));
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON with a trailing newline (the committed form).
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut s = serde_json::to_string_pretty(&document()).unwrap_or_else(|e| {
            format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}")
        });
        s.push('\n');
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::path::PathBuf;

    fn committed_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/fastvm.json")
    }

    #[test]
    fn openapi_matches_committed_file() -> Result<(), Box<dyn std::error::Error>> {
        let generated = document_json();
        let path = committed_path();
        if std::env::var_os("FASTVM_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, generated)?;
            return Ok(());
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from the OpenAPI document the code generates; regenerate it with \
             `FASTVM_UPDATE_OPENAPI=1 cargo test -p fastvm-server openapi` and commit it",
            path.display()
        );
        Ok(())
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    match (k.as_str(), x.as_str()) {
                        ("$ref", Some(r)) => out.push(r.to_owned()),
                        _ => collect_refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn openapi_is_3_1_and_every_ref_resolves() -> Result<(), Box<dyn std::error::Error>> {
        let doc: Value = serde_json::from_str(document_json())?;
        assert!(doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")));
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "dangling {r}"
            );
        }
        for (path, method) in [
            ("/healthz", "get"),
            ("/v1/vms", "get"),
            ("/v1/vms", "post"),
            ("/v1/vms/{id}", "patch"),
            ("/v1/vms/{id}/exec", "post"),
            ("/v1/snapshots", "post"),
            ("/v1/snapshots/{id}", "delete"),
            ("/v1/vms/{id}/ttl/refresh", "post"),
            ("/v1/org/quotas", "get"),
        ] {
            assert!(
                doc["paths"][path][method].is_object(),
                "missing {method} {path}"
            );
        }
        assert_eq!(
            doc["paths"]["/v1/vms"]["post"]["requestBody"]["content"]["application/json"]["schema"]
                ["$ref"],
            "#/components/schemas/LaunchVmRequest"
        );
        Ok(())
    }

    /// Validation failures are 400 on every route (see [`crate::error`]): no
    /// operation documents a 422, and every operation that takes a body or a
    /// query documents the 400 it answers when they break a rule.
    #[test]
    fn validation_is_400_on_every_operation() -> Result<(), Box<dyn std::error::Error>> {
        let doc: Value = serde_json::from_str(document_json())?;
        let paths = doc["paths"].as_object().ok_or("no paths")?;
        for (path, item) in paths {
            for (method, op) in item.as_object().ok_or("path item")? {
                let responses = &op["responses"];
                assert!(
                    responses.get("422").is_none(),
                    "{method} {path} documents a 422; validation answers 400"
                );
                let takes_input = op.get("requestBody").is_some()
                    || op["parameters"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p["in"] == "query"));
                if takes_input {
                    assert!(
                        responses.get("400").is_some(),
                        "{method} {path} takes input but documents no 400"
                    );
                }
            }
        }
        Ok(())
    }

    /// Resolves `#/components/schemas/X` references.
    fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => resolve(
                doc,
                &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")],
            ),
            None => schema,
        }
    }

    /// Checks `value` against `schema` (the parts of JSON Schema the document
    /// uses): object properties (no unknown ones, required ones present),
    /// array items, enums, `null` alternatives. Returns what is wrong, at `at`.
    fn check_example(doc: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
        let schema = resolve(doc, schema);
        let mut errs = Vec::new();
        if let Some(alts) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
            let fits = alts.iter().any(|alt| {
                let alt = resolve(doc, alt);
                if alt["type"] == "null" {
                    value.is_null()
                } else {
                    check_example(doc, alt, value, at).is_empty()
                }
            });
            if !fits {
                errs.push(format!(
                    "{at}: {value} fits none of its schema's alternatives"
                ));
            }
            return errs;
        }
        if let Some(all) = schema["allOf"].as_array() {
            for s in all {
                errs.extend(check_example(doc, s, value, at));
            }
            return errs;
        }
        if let Some(values) = schema["enum"].as_array() {
            if !values.contains(value) {
                errs.push(format!("{at}: {value} is not one of {values:?}"));
            }
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let type_ok = types.is_empty()
            || types.iter().any(|t| match *t {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                "null" => value.is_null(),
                _ => true,
            });
        if !type_ok {
            errs.push(format!("{at}: {value} is not of type {types:?}"));
            return errs;
        }
        match value {
            Value::Object(o) => {
                if let Some(props) = schema["properties"].as_object() {
                    for (k, v) in o {
                        match props.get(k) {
                            Some(s) => errs.extend(check_example(doc, s, v, &format!("{at}.{k}"))),
                            None => errs.push(format!("{at}: unknown field {k:?}")),
                        }
                    }
                    for r in schema["required"].as_array().into_iter().flatten() {
                        if let Some(r) = r.as_str().filter(|r| !o.contains_key(*r)) {
                            errs.push(format!("{at}: missing required field {r:?}"));
                        }
                    }
                } else if let Some(extra) =
                    schema.get("additionalProperties").filter(|a| a.is_object())
                {
                    for (k, v) in o {
                        errs.extend(check_example(doc, extra, v, &format!("{at}.{k}")));
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    errs.extend(check_example(
                        doc,
                        &schema["items"],
                        v,
                        &format!("{at}[{i}]"),
                    ));
                }
            }
            _ => {}
        }
        errs
    }

    /// The API reference (`/docs`) is only as good as the document: every
    /// operation has a summary and a description, and shows an example of its
    /// JSON request body and of each 2xx JSON answer, each of which fits its
    /// schema.
    #[test]
    fn every_operation_is_documented_with_examples() -> Result<(), Box<dyn std::error::Error>> {
        let doc: Value = serde_json::from_str(document_json())?;
        let paths = doc["paths"].as_object().ok_or("no paths")?;
        let mut missing = Vec::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().ok_or("path item")? {
                let name = format!(
                    "{} {path} ({})",
                    method.to_uppercase(),
                    op["operationId"].as_str().unwrap_or("?")
                );
                for field in ["summary", "description"] {
                    if op[field].as_str().is_none_or(|s| s.trim().is_empty()) {
                        missing.push(format!(
                            "{name}: no {field}; add `{field} = \"...\"` to its #[utoipa::path(...)]"
                        ));
                    }
                }
                let mut media = Vec::new();
                if let Some(m) = op["requestBody"]["content"]["application/json"].as_object() {
                    media.push(("request body".to_owned(), m));
                }
                for (status, r) in op["responses"].as_object().ok_or("responses")? {
                    if let Some(m) = r["content"]["application/json"]
                        .as_object()
                        .filter(|_| status.starts_with('2'))
                    {
                        media.push((format!("{status} response"), m));
                    }
                }
                for (what, m) in media {
                    let hint = if what == "request body" {
                        "request_body(content = Type, example = json!(examples::...()))"
                    } else {
                        "(status = ..., body = Type, example = json!(examples::...()))"
                    };
                    match m.get("example") {
                        None => missing.push(format!(
                            "{name}: no example of its {what}; add a function to \
                             crates/fastvm-server/src/openapi/examples.rs and use it: {hint}"
                        )),
                        Some(example) => {
                            let schema = m.get("schema").cloned().unwrap_or(Value::Null);
                            for e in check_example(&doc, &schema, example, "example") {
                                missing.push(format!("{name}: the example of its {what} does not fit its schema: {e}"));
                            }
                        }
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "operations of the OpenAPI document lack documentation (the API reference at /docs shows it; \
             then regenerate with `FASTVM_UPDATE_OPENAPI=1 cargo test -p fastvm-server openapi`):\n{}",
            missing.join("\n")
        );
        Ok(())
    }

    #[test]
    fn the_example_checker_catches_a_bad_example() -> Result<(), Box<dyn std::error::Error>> {
        let doc: Value = serde_json::from_str(document_json())?;
        let vm = json!({"$ref": "#/components/schemas/VM"});
        assert!(check_example(&doc, &vm, &examples::vm(), "vm").is_empty());
        let mut bad = examples::vm();
        bad["cpuCount"] = json!(1);
        bad["status"] = json!("sleeping");
        if let Some(o) = bad.as_object_mut() {
            o.remove("orgId");
        }
        let errs = check_example(&doc, &vm, &bad, "vm").join("\n");
        assert!(errs.contains("unknown field \"cpuCount\""), "{errs}");
        assert!(errs.contains("missing required field \"orgId\""), "{errs}");
        assert!(errs.contains("sleeping"), "{errs}");
        Ok(())
    }
}
