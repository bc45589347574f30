//! Configuration loading shared by every binary: defaults, then a TOML file,
//! then environment variables (`PREFIX_FIELD`, nested with `__`), parsed
//! once into typed structs.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Exit status for a bad configuration (EX_USAGE / EX_CONFIG family).
pub const EXIT_BAD_CONFIG: i32 = 64;

pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env_prefix: &str,
) -> Result<T, String> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(format!("config file {} does not exist", path.display()));
        }
        fig = fig.merge(Toml::file(path));
    }
    fig = fig.merge(Env::prefixed(env_prefix).split("__"));
    fig.extract().map_err(|e| e.to_string())
}

/// Loads and validates a binary's configuration. On failure it says why on
/// stderr and returns exit status 64, before anything is bound or opened.
pub fn load_or_exit<T: Serialize + DeserializeOwned + Default>(
    bin: &str,
    file: Option<&Path>,
    env_prefix: &str,
    validate: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, std::process::ExitCode> {
    let checked = load::<T>(file, env_prefix).and_then(|cfg| validate(&cfg).map(|()| cfg));
    checked.map_err(|e| {
        eprintln!("{bin}: bad configuration: {e}");
        std::process::ExitCode::from(EXIT_BAD_CONFIG as u8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Cfg {
        name: String,
        port: u16,
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"from-file\"\nport = 7\n").expect("write");
        let c: Cfg = load(Some(&path), "LATTICE_TEST_CFG_A_").expect("load");
        assert_eq!(
            c,
            Cfg {
                name: "from-file".into(),
                port: 7
            }
        );
        let err = load::<Cfg>(Some(&dir.path().join("missing.toml")), "X_").expect_err("missing");
        assert!(err.contains("does not exist"));
        std::fs::write(&path, "port = \"seven\"\n").expect("write");
        assert!(
            load::<Cfg>(Some(&path), "LATTICE_TEST_CFG_B_").is_err(),
            "type errors are reported"
        );
    }
}
