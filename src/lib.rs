//! The `lattice` operator crate: the in-process lattice harness (used by
//! `lattice dev`, the integration tests and the benchmarks), the admin client
//! and the load commands.

pub mod admin;
pub mod bench;
pub mod dev;
pub mod faults;
pub mod harness;

/// The example policy bundle of `deploy/policies/example`, built in so that
/// `lattice dev` runs from any directory (a test keeps the two equal).
pub fn example_bundle() -> lattice_shared::policy::BundleFiles {
    lattice_shared::policy::BundleFiles::from_files(
        [
            (
                "schema.cedarschema",
                include_str!("../deploy/policies/example/schema.cedarschema"),
            ),
            (
                "lattice.cedar",
                include_str!("../deploy/policies/example/lattice.cedar"),
            ),
            (
                "context.cedar",
                include_str!("../deploy/policies/example/context.cedar"),
            ),
            (
                "admin.cedar",
                include_str!("../deploy/policies/example/admin.cedar"),
            ),
            (
                "entities.json",
                include_str!("../deploy/policies/example/entities.json"),
            ),
            (
                "tests.json",
                include_str!("../deploy/policies/example/tests.json"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("the example bundle's file names are valid") // fixed names above
}
