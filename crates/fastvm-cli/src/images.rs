//! `fastvm images ...`: build the guest image cache ahead of the first launch.

use clap::Subcommand;
use fastvm_worker::images::{find_agent_binary, ImageStore};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ImagesCommand {
    /// Build the default guest image (Debian kernel + agent initramfs + rootfs); a no-op when cached.
    Build {
        /// Data directory (default: per-user data dir).
        #[arg(long, env = "FASTVM_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Debian mirror mmdebstrap downloads from.
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
    },
}

pub async fn run(cmd: ImagesCommand) -> anyhow::Result<()> {
    match cmd {
        ImagesCommand::Build { data_dir, mirror } => {
            let dir = data_dir.unwrap_or_else(crate::default_data_dir);
            let store = ImageStore::new(&dir.join("images"), &mirror, find_agent_binary()?)?;
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template(
                "{spinner} {elapsed:>4} {wide_msg}",
            )?);
            bar.enable_steady_tick(Duration::from_millis(120));
            let b = bar.clone();
            let progress = Arc::new(move |line: &str| b.set_message(line.to_owned()));
            let image = store
                .ensure_default(&(progress as fastvm_worker::images::Progress))
                .await;
            bar.finish_and_clear();
            let image = image?;
            println!("image {}", image.id);
            println!("  kernel  {}", image.kernel.display());
            println!("  initrd  {}", image.initrd.display());
            println!("  rootfs  {}", image.rootfs.display());
            Ok(())
        }
    }
}
