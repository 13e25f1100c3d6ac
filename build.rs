//! Compiles `proto/payra/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a build
//! needs nothing but cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/payra/v1/common.proto",
        "proto/payra/v1/registration.proto",
        "proto/payra/v1/enrollment.proto",
        "proto/payra/v1/verification.proto",
        "proto/payra/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("payra_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
