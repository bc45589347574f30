//! Device posture an agent reports with its requests (not attested), and
//! the bound on its job type: plain data and its wire form, without Cedar.

use serde::{Deserialize, Serialize};

/// Device posture reported by an agent. Unreported claims are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Posture {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_patched: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_encrypted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
}

pub const MAX_POSTURE_STRING: usize = 128;
pub const MAX_JOB_TYPE: usize = 128;

impl Posture {
    pub fn from_proto(p: &crate::proto::Posture) -> Result<Self, String> {
        if p.os_version
            .as_ref()
            .is_some_and(|v| v.len() > MAX_POSTURE_STRING)
        {
            return Err(format!(
                "posture.os_version is longer than {MAX_POSTURE_STRING} bytes"
            ));
        }
        Ok(Self {
            os_patched: p.os_patched,
            disk_encrypted: p.disk_encrypted,
            secure_boot: p.secure_boot,
            os_version: p.os_version.clone(),
        })
    }
    pub fn to_proto(&self) -> crate::proto::Posture {
        crate::proto::Posture {
            os_patched: self.os_patched,
            disk_encrypted: self.disk_encrypted,
            secure_boot: self.secure_boot,
            os_version: self.os_version.clone(),
        }
    }
}
