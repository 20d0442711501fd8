//! `cargo pgharness image`: a Postgres image built from Debian's packages, for machines
//! that reach no container registry (`pgharness_runner::image`).

use std::process::ExitCode;

use pgharness::backend::container::LOCAL_IMAGE;

use crate::render::{Renderer, say};

/// `image`'s arguments.
#[derive(clap::Args)]
pub struct Image {
    /// The image name to create.
    #[arg(long, default_value = LOCAL_IMAGE)]
    tag: String,
    /// Rebuild even if the image exists.
    #[arg(long)]
    force: bool,
}

impl Image {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        if !self.force && pgharness_runner::image::exists(&self.tag).await? {
            say(&format!(
                "{} already exists (--force rebuilds it)",
                self.tag
            ));
            return Ok(ExitCode::SUCCESS);
        }
        let renderer = Renderer::new();
        pgharness_runner::image::build(&self.tag, &|event| renderer.event(event)).await?;
        Ok(ExitCode::SUCCESS)
    }
}
