//! Compiles `proto/` with a vendored protoc: no system package is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = "../proto";
    println!("cargo:rerun-if-changed={proto_dir}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .codec_path("crate::proto::codec::LatticeCodec")
        .compile_with_config(
            config,
            &[format!("{proto_dir}/lattice/v1/lattice.proto")],
            &[proto_dir.to_string()],
        )?;
    Ok(())
}
