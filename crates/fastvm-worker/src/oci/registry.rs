//! Registry pulls: resolve an image reference to one linux/amd64 (or the
//! asked platform's) image manifest, read its config, and bring its layer
//! blobs into a digest-addressed cache on disk.
//!
//! ```text
//!  <data>/oci/blobs/sha256/<hex>   layer blobs (compressed, as pulled), verified
//!                                  against their digest while downloading
//! ```
//!
//! Blobs stream to disk (never held in memory), so pulling a large image
//! costs a fixed amount of memory. A blob already in the cache is not
//! downloaded again: importing an image twice, or two images sharing a base,
//! reuses it. Credentials live only in the request that uses them.
//!
//! Registries named with `--insecure-registry HOST:PORT` are spoken to over
//! plain HTTP; every other registry over HTTPS.

use super::layer::Compression;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Largest compressed layer accepted (a hostile manifest could claim more).
pub const MAX_LAYER_BYTES: u64 = 16 << 30;
/// Largest image config accepted.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Most layers of one image.
const MAX_LAYERS: usize = 256;

/// Why a pull failed; the message is safe to show the user (no paths, no
/// credentials).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0:?} is not a valid image reference: {1}")]
    BadReference(String, String),
    #[error("{0:?} is not a platform of the form os/arch[/variant]")]
    BadPlatform(String),
    #[error("the registry refused the credentials for {0}: {1}")]
    Unauthorized(String, String),
    #[error("image {0} was not found in its registry: {1}")]
    NotFound(String, String),
    #[error("image {image} has no {platform} variant (it has: {available})")]
    NoPlatform {
        image: String,
        platform: String,
        available: String,
    },
    #[error("image {image} is for {found}, not {wanted}")]
    WrongPlatform {
        image: String,
        found: String,
        wanted: String,
    },
    #[error("image {0}: {1}")]
    Unsupported(String, String),
    #[error("pulling {0} failed: {1}")]
    Registry(String, String),
    #[error("the layer cache failed: {0}")]
    Cache(String),
}

/// The parts of an image config that matter to a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// `Env` as `KEY=VALUE` pairs (later entries win).
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A pulled image: layers (bottom first) in the cache, and its config.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Digest of the platform's image manifest.
    pub manifest_digest: String,
    pub layers: Vec<CachedLayer>,
    pub defaults: ImageDefaults,
    /// Bytes downloaded by this pull (0 when every layer was cached).
    pub downloaded_bytes: u64,
    /// Layers found in the cache.
    pub cached_layers: usize,
    /// The image manifest and config as the registry served them (what a
    /// builder needs to load the image unchanged, digests included).
    pub manifest: RawBlob,
    pub config: RawBlob,
    /// The normalised reference (`docker.io/library/busybox:latest`).
    pub name: String,
}

/// A small blob kept in memory: a manifest or a config.
#[derive(Debug, Clone)]
pub struct RawBlob {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct CachedLayer {
    pub digest: String,
    pub path: PathBuf,
    pub compression: Compression,
    pub size: u64,
}

/// A pull request: what and how.
pub struct PullRequest<'a> {
    pub image: &'a str,
    /// `os/arch[/variant]`; `linux/amd64` when `None`.
    pub platform: Option<&'a str>,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Platform {
    os: String,
    arch: String,
    variant: Option<String>,
}

impl Platform {
    fn parse(s: &str) -> Option<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Some(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Some(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => None,
        }
    }
    fn show(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.arch),
            None => format!("{}/{}", self.os, self.arch),
        }
    }
    /// The index entry for this platform: os and arch equal, the variant
    /// equal when one was asked for.
    fn pick(&self, entries: &[ImageIndexEntry]) -> Option<String> {
        entries
            .iter()
            .find(|e| {
                e.platform.as_ref().is_some_and(|p| {
                    p.os == self.os
                        && p.architecture == self.arch
                        && (self.variant.is_none() || p.variant == self.variant)
                })
            })
            .map(|e| e.digest.clone())
    }
}

/// Pulls images into the layer cache at `<root>/blobs/sha256/`.
pub struct Puller {
    root: PathBuf,
    insecure: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    pub(super) config: Option<RunConfig>,
}

#[derive(Deserialize, Default)]
pub(super) struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

pub(super) fn parse_defaults(cfg: Option<RunConfig>) -> ImageDefaults {
    let cfg = cfg.unwrap_or_default();
    let mut env = BTreeMap::new();
    for kv in cfg.env.unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            if !k.is_empty() {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    ImageDefaults {
        env,
        working_dir: cfg.working_dir.filter(|w| !w.is_empty()),
        user: cfg.user.filter(|u| !u.is_empty()),
        entrypoint: cfg.entrypoint.unwrap_or_default(),
        cmd: cfg.cmd.unwrap_or_default(),
    }
}

fn classify(image: &str, e: oci_client::errors::OciDistributionError) -> PullError {
    use oci_client::errors::OciDistributionError as E;
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    match e {
        E::AuthenticationFailure(m) => PullError::Unauthorized(image.to_owned(), m),
        E::UnauthorizedError { .. } => PullError::Unauthorized(image.to_owned(), text),
        E::ImageManifestNotFoundError(m) => PullError::NotFound(image.to_owned(), m),
        E::UnsupportedMediaTypeError(m) => PullError::Unsupported(
            image.to_owned(),
            format!("unsupported manifest media type {m}"),
        ),
        E::UnsupportedSchemaVersionError(v) => PullError::Unsupported(
            image.to_owned(),
            format!("manifest schema version {v} is not supported (only 2)"),
        ),
        _ if has(&[
            "manifest unknown",
            "name unknown",
            "blob unknown",
            "not found",
            "404",
        ]) =>
        {
            PullError::NotFound(image.to_owned(), text)
        }
        _ if has(&[
            "unauthorized",
            "denied",
            "authentication required",
            "401",
            "403",
        ]) =>
        {
            PullError::Unauthorized(image.to_owned(), text)
        }
        _ => PullError::Registry(image.to_owned(), text),
    }
}

impl Puller {
    /// `root`: the cache directory (`<data>/oci`); `insecure`: `HOST:PORT`
    /// registries spoken to over plain HTTP.
    pub fn new(root: impl Into<PathBuf>, insecure: Vec<String>) -> Puller {
        Puller {
            root: root.into(),
            insecure,
        }
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        blob_path(&self.root, digest)
    }

    fn client(&self, platform: Platform) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            platform_resolver: Some(Box::new(move |entries: &[ImageIndexEntry]| {
                platform.pick(entries)
            })),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        })
    }

    /// Resolve `req.image` for its platform and bring every layer into the
    /// cache. `progress` gets one line per step ("layer 2/5 ... cached").
    pub async fn pull(
        &self,
        req: &PullRequest<'_>,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PulledImage, PullError> {
        let image = req.image.trim();
        let reference: Reference = image.parse().map_err(|e: oci_client::ParseError| {
            PullError::BadReference(image.to_owned(), e.to_string())
        })?;
        let wanted_text = req.platform.unwrap_or("linux/amd64");
        let wanted = Platform::parse(wanted_text)
            .ok_or_else(|| PullError::BadPlatform(wanted_text.to_owned()))?;
        let auth = match (req.username, req.password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u.to_owned(), p.to_owned()),
            (Some(u), None) => RegistryAuth::Basic(u.to_owned(), String::new()),
            _ => RegistryAuth::Anonymous,
        };
        let client = self.client(wanted.clone());
        progress(format!("resolving {image} for {}", wanted.show()));
        let (manifest, manifest_digest) = match client.pull_image_manifest(&reference, &auth).await
        {
            Ok(m) => m,
            Err(oci_client::errors::OciDistributionError::ImageManifestNotFoundError(m))
                if m.contains("no entry found in image index") =>
            {
                return Err(self
                    .no_platform(&client, &reference, &auth, image, &wanted)
                    .await);
            }
            Err(e) => return Err(classify(image, e)),
        };
        self.check_manifest(image, &manifest)?;
        let (config, config_bytes) = self
            .pull_config(&client, &reference, &manifest.config, image)
            .await?;
        // The manifest's own bytes (the resolved platform's, by digest).
        let by_digest = Reference::with_digest(
            reference.resolve_registry().to_owned(),
            reference.repository().to_owned(),
            manifest_digest.clone(),
        );
        let (manifest_bytes, _) = client
            .pull_manifest_raw(
                &by_digest,
                &auth,
                &[
                    oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
                    oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE,
                ],
            )
            .await
            .map_err(|e| classify(image, e))?;
        let manifest_media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_owned());
        let found = Platform {
            os: config.os.clone(),
            arch: config.architecture.clone(),
            variant: config.variant.clone(),
        };
        if found.os != wanted.os || found.arch != wanted.arch {
            return Err(PullError::WrongPlatform {
                image: image.to_owned(),
                found: found.show(),
                wanted: wanted.show(),
            });
        }
        let defaults = parse_defaults(config.config);
        let dir = self.root.join("blobs").join("sha256");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| PullError::Cache(format!("cannot create the layer cache: {e}")))?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        let (mut downloaded, mut cached) = (0u64, 0usize);
        let n = manifest.layers.len();
        for (i, desc) in manifest.layers.iter().enumerate() {
            let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
                PullError::Unsupported(
                    image.to_owned(),
                    format!(
                        "layer {} has media type {:?}, which is not a tar layer",
                        desc.digest, desc.media_type
                    ),
                )
            })?;
            let path = self.blob_path(&desc.digest).ok_or_else(|| {
                PullError::Unsupported(
                    image.to_owned(),
                    format!("layer digest {:?} is not a sha256 digest", desc.digest),
                )
            })?;
            let size = u64::try_from(desc.size).unwrap_or(0);
            if path.is_file() {
                super::cache::touch(&path);
                cached += 1;
                progress(format!(
                    "layer {}/{n} {} ({size} bytes): cached",
                    i + 1,
                    short(&desc.digest)
                ));
            } else {
                progress(format!(
                    "layer {}/{n} {} ({size} bytes): downloading",
                    i + 1,
                    short(&desc.digest)
                ));
                let t0 = std::time::Instant::now();
                downloaded += self
                    .download(&client, &reference, desc, &path, image)
                    .await?;
                progress(format!(
                    "layer {}/{n} {}: downloaded in {} ms",
                    i + 1,
                    short(&desc.digest),
                    t0.elapsed().as_millis()
                ));
            }
            layers.push(CachedLayer {
                digest: desc.digest.clone(),
                path,
                compression,
                size,
            });
        }
        Ok(PulledImage {
            manifest: RawBlob {
                digest: manifest_digest.clone(),
                media_type: manifest_media_type,
                bytes: manifest_bytes,
            },
            config: RawBlob {
                digest: manifest.config.digest.clone(),
                media_type: manifest.config.media_type.clone(),
                bytes: config_bytes,
            },
            name: reference.whole(),
            manifest_digest,
            layers,
            defaults,
            downloaded_bytes: downloaded,
            cached_layers: cached,
        })
    }

    fn check_manifest(&self, image: &str, m: &OciImageManifest) -> Result<(), PullError> {
        if m.layers.len() > MAX_LAYERS {
            return Err(PullError::Unsupported(
                image.to_owned(),
                format!("{} layers (at most {MAX_LAYERS})", m.layers.len()),
            ));
        }
        for l in &m.layers {
            if l.size < 0 || l.size as u64 > MAX_LAYER_BYTES {
                return Err(PullError::Unsupported(
                    image.to_owned(),
                    format!(
                        "layer {} claims {} bytes (at most {MAX_LAYER_BYTES})",
                        l.digest, l.size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The error for an index without the wanted platform, naming those it has.
    async fn no_platform(
        &self,
        client: &Client,
        reference: &Reference,
        auth: &RegistryAuth,
        image: &str,
        wanted: &Platform,
    ) -> PullError {
        let available = match client.pull_manifest(reference, auth).await {
            Ok((oci_client::manifest::OciManifest::ImageIndex(index), _)) => index
                .manifests
                .iter()
                .filter_map(|e| e.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect::<Vec<_>>()
                .join(", "),
            _ => "unknown".into(),
        };
        PullError::NoPlatform {
            image: image.to_owned(),
            platform: wanted.show(),
            available,
        }
    }

    async fn pull_config(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &OciDescriptor,
        image: &str,
    ) -> Result<(ConfigFile, Vec<u8>), PullError> {
        if desc.size < 0 || desc.size as u64 > MAX_CONFIG_BYTES {
            return Err(PullError::Unsupported(
                image.to_owned(),
                format!(
                    "image config of {} bytes (at most {MAX_CONFIG_BYTES})",
                    desc.size
                ),
            ));
        }
        let mut buf = Vec::new();
        client
            .pull_blob(reference, desc, &mut buf)
            .await
            .map_err(|e| classify(image, e))?;
        let config = serde_json::from_slice(&buf).map_err(|e| {
            PullError::Unsupported(
                image.to_owned(),
                format!("its config is not valid JSON: {e}"),
            )
        })?;
        Ok((config, buf))
    }

    /// Stream one blob into the cache (verified by oci-client against its
    /// digest; we hash it again before committing). Returns its size.
    async fn download(
        &self,
        client: &Client,
        reference: &Reference,
        desc: &OciDescriptor,
        dest: &Path,
        image: &str,
    ) -> Result<u64, PullError> {
        let tmp = dest.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| PullError::Cache(format!("cannot create a layer file: {e}")))?;
            let mut w = HashingWriter {
                inner: tokio::io::BufWriter::with_capacity(1 << 20, file),
                hash: Sha256::new(),
                len: 0,
                cap: MAX_LAYER_BYTES,
            };
            client
                .pull_blob(reference, desc, &mut w)
                .await
                .map_err(|e| classify(image, e))?;
            w.inner
                .flush()
                .await
                .map_err(|e| PullError::Cache(format!("cannot write a layer file: {e}")))?;
            w.inner
                .get_ref()
                .sync_all()
                .await
                .map_err(|e| PullError::Cache(format!("cannot write a layer file: {e}")))?;
            let got = format!("sha256:{}", hex::encode(w.hash.finalize()));
            if got != desc.digest {
                return Err(PullError::Registry(
                    image.to_owned(),
                    format!("layer {} arrived with digest {got}", desc.digest),
                ));
            }
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| PullError::Cache(format!("cannot commit a layer file: {e}")))?;
            Ok(w.len)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

/// `<root>/blobs/sha256/<hex>` of a well-formed sha256 digest.
pub(super) fn blob_path(root: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| root.join("blobs").join("sha256").join(hex))
}

pub(super) fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

/// Writes through, hashing and counting, and refuses more than `cap` bytes.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
    cap: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HashingWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.len + buf.len() as u64 > self.cap {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "layer larger than its limit",
            )));
        }
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                this.hash.update(&buf[..n]);
                this.len += n as u64;
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_pick() {
        assert_eq!(
            Platform::parse("linux/amd64").map(|p| p.show()),
            Some("linux/amd64".into())
        );
        assert_eq!(
            Platform::parse("linux/arm64/v8").map(|p| p.show()),
            Some("linux/arm64/v8".into())
        );
        for bad in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/amd64/v1/x",
            "linux/amd 64",
        ] {
            assert!(Platform::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn config_defaults() {
        let cfg: ConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=b=c","=x","junk"],"WorkingDir":"/app","User":"1000:1000","Cmd":["sh"]}}"#,
        )
        .expect("parse");
        let d = parse_defaults(cfg.config);
        assert_eq!(d.env.get("PATH").map(String::as_str), Some("/bin"));
        assert_eq!(d.env.get("A").map(String::as_str), Some("b=c"));
        assert_eq!(d.env.len(), 2);
        assert_eq!(d.working_dir.as_deref(), Some("/app"));
        assert_eq!(d.user.as_deref(), Some("1000:1000"));
        assert_eq!(d.cmd, vec!["sh".to_string()]);
        let bare: ConfigFile =
            serde_json::from_str(r#"{"architecture":"amd64","os":"linux"}"#).expect("parse");
        assert_eq!(parse_defaults(bare.config), ImageDefaults::default());
    }

    #[test]
    fn blob_paths_only_for_sha256_digests() {
        let p = Puller::new("/c", vec![]);
        let hex = "a".repeat(64);
        assert_eq!(
            p.blob_path(&format!("sha256:{hex}")),
            Some(PathBuf::from(format!("/c/blobs/sha256/{hex}")))
        );
        for bad in [
            "sha256:../../etc",
            "sha512:aa",
            &format!("sha256:{}", "A".repeat(64)),
            "sha256:",
        ] {
            assert!(p.blob_path(bad).is_none(), "{bad}");
        }
    }
}
