//! The bundle file: `HFPATCH1` + a protobuf `PatchBundle`.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hotfleet_proto::v1::{ModuleSource, PatchBundle};
use prost::Message;

use crate::{key_id, sha256_hex, Manifest, PatchError, SigningKeyFile, TrustedKeys};

/// First bytes of every bundle file.
pub const BUNDLE_MAGIC: &[u8; 8] = b"HFPATCH1";

/// Size bounds every reader enforces before trusting a bundle.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bundle_bytes: usize,
    pub max_module_bytes: usize,
    pub max_modules: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_bundle_bytes: 8 * 1024 * 1024, max_module_bytes: 2 * 1024 * 1024, max_modules: 512 }
    }
}

/// A decoded, structurally valid bundle (signature not yet checked).
#[derive(Debug, Clone)]
pub struct Bundle {
    pub manifest: Manifest,
    manifest_bytes: Vec<u8>,
    /// (module name, source), in manifest order.
    pub modules: Vec<(String, String)>,
    signature: Option<[u8; 64]>,
    signer: Option<VerifyingKey>,
}

impl Bundle {
    /// A new unsigned bundle. Modules are sorted by name; the manifest's module
    /// list is computed from the sources, so it can never disagree with them.
    pub fn create(mut manifest: Manifest, mut modules: Vec<(String, String)>) -> Result<Self, PatchError> {
        modules.sort_by(|a, b| a.0.cmp(&b.0));
        manifest.modules = modules
            .iter()
            .map(|(name, source)| crate::ModuleEntry {
                name: name.clone(),
                sha256: sha256_hex(source.as_bytes()),
                size: source.len() as u64,
            })
            .collect();
        manifest.validate()?;
        let manifest_bytes = manifest.canonical_bytes();
        let bundle = Self { manifest, manifest_bytes, modules, signature: None, signer: None };
        bundle.check_limits(&Limits::default())?;
        Ok(bundle)
    }

    /// Parses and checks a bundle: header, encoding, manifest, module names,
    /// every digest and every size limit. Signature is checked by [`verify`](Self::verify).
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, PatchError> {
        if bytes.len() > limits.max_bundle_bytes {
            return Err(PatchError::TooLarge { size: bytes.len(), limit: limits.max_bundle_bytes });
        }
        let body = bytes.strip_prefix(BUNDLE_MAGIC.as_slice()).ok_or(PatchError::NotABundle)?;
        let raw = PatchBundle::decode(body).map_err(|err| PatchError::Corrupt(err.to_string()))?;
        let manifest: Manifest =
            serde_json::from_slice(&raw.manifest).map_err(|err| PatchError::InvalidManifest(err.to_string()))?;
        manifest.validate()?;
        // The id is defined over the canonical form; a manifest that is valid JSON
        // but not canonical would let two byte strings claim one patch.
        if manifest.canonical_bytes() != raw.manifest {
            return Err(PatchError::InvalidManifest("manifest is not in canonical form".into()));
        }
        if raw.modules.len() != manifest.modules.len() {
            return Err(PatchError::Corrupt(format!(
                "manifest lists {} modules but the bundle carries {}",
                manifest.modules.len(),
                raw.modules.len()
            )));
        }
        let mut modules = Vec::with_capacity(raw.modules.len());
        for (entry, ModuleSource { name, source }) in manifest.modules.iter().zip(raw.modules) {
            if entry.name != name {
                return Err(PatchError::Corrupt(format!("module {name:?} is not the manifest's {:?}", entry.name)));
            }
            if entry.size != source.len() as u64 || entry.sha256 != sha256_hex(source.as_bytes()) {
                return Err(PatchError::DigestMismatch { module: name });
            }
            modules.push((name, source));
        }
        let signature = match raw.signature.len() {
            0 => None,
            64 => raw.signature.as_slice().try_into().ok(),
            n => return Err(PatchError::Corrupt(format!("signature is {n} bytes, expected 64"))),
        };
        let signer = match raw.signer_public_key.len() {
            0 => None,
            _ => {
                let key: [u8; 32] = raw
                    .signer_public_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| PatchError::Corrupt("signer key is not 32 bytes".into()))?;
                Some(
                    VerifyingKey::from_bytes(&key)
                        .map_err(|_| PatchError::Corrupt("signer key is not an ed25519 key".into()))?,
                )
            }
        };
        let bundle = Self { manifest, manifest_bytes: raw.manifest, modules, signature, signer };
        bundle.check_limits(limits)?;
        Ok(bundle)
    }

    fn check_limits(&self, limits: &Limits) -> Result<(), PatchError> {
        if self.modules.len() > limits.max_modules {
            return Err(PatchError::InvalidManifest(format!(
                "{} modules, over the limit of {}",
                self.modules.len(),
                limits.max_modules
            )));
        }
        for (name, source) in &self.modules {
            if source.len() > limits.max_module_bytes {
                return Err(PatchError::InvalidModule {
                    module: name.clone(),
                    reason: format!(
                        "source is {} bytes, over the {}-byte limit",
                        source.len(),
                        limits.max_module_bytes
                    ),
                });
            }
        }
        Ok(())
    }

    /// The bundle file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let raw = PatchBundle {
            manifest: self.manifest_bytes.clone(),
            modules: self
                .modules
                .iter()
                .map(|(name, source)| ModuleSource { name: name.clone(), source: source.clone() })
                .collect(),
            signature: self.signature.map(|s| s.to_vec()).unwrap_or_default(),
            signer_public_key: self.signer.map(|k| k.as_bytes().to_vec()).unwrap_or_default(),
        };
        let mut out = BUNDLE_MAGIC.to_vec();
        raw.encode(&mut out).unwrap_or_default();
        out
    }

    /// The patch id: hex sha256 of the canonical manifest.
    pub fn id(&self) -> String {
        sha256_hex(&self.manifest_bytes)
    }

    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    /// Key id of the signer, if signed.
    pub fn signer_id(&self) -> Option<String> {
        self.signer.as_ref().map(key_id)
    }

    /// Signs (or re-signs) the manifest.
    pub fn sign(&mut self, key: &SigningKeyFile) {
        self.signature = Some(key.sign(&self.manifest_bytes));
        self.signer = Some(key.public());
    }

    /// Checks the bundle is signed by a trusted key and the signature holds.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<(), PatchError> {
        let id = self.id();
        let (Some(signature), Some(signer)) = (self.signature, self.signer) else {
            return Err(PatchError::Unsigned { id });
        };
        if !trusted.contains(&signer) {
            return Err(PatchError::UntrustedSigner { id, key_id: key_id(&signer) });
        }
        signer
            .verify(&self.manifest_bytes, &Signature::from_bytes(&signature))
            .map_err(|_| PatchError::BadSignature { id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MANIFEST_FORMAT;

    fn manifest() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            target_build: "zone-1.4.2".into(),
            parent: None,
            packages: vec!["zone".into()],
            modules: vec![],
            author: "sre@example".into(),
            created_at: "2026-11-30T00:00:00Z".into(),
            description: "fix damage".into(),
        }
    }

    fn signed() -> (Bundle, SigningKeyFile) {
        let mut bundle = Bundle::create(manifest(), vec![("zone.combat".into(), "def f():\n    return 2\n".into())])
            .expect("create");
        let key = SigningKeyFile::generate().expect("key");
        bundle.sign(&key);
        (bundle, key)
    }

    #[test]
    fn round_trip_keeps_id_and_signature() {
        let (bundle, key) = signed();
        let decoded = Bundle::decode(&bundle.encode(), &Limits::default()).expect("decode");
        assert_eq!(decoded.id(), bundle.id());
        assert_eq!(decoded.modules, bundle.modules);
        decoded.verify(&TrustedKeys::new(vec![key.public()])).expect("verifies");
    }

    #[test]
    fn refuses_unsigned_untrusted_and_tampered() {
        let unsigned = Bundle::create(manifest(), vec![("zone.combat".into(), "x = 1\n".into())]).expect("create");
        let (bundle, key) = signed();
        let trusted = TrustedKeys::new(vec![key.public()]);
        assert!(matches!(unsigned.verify(&trusted), Err(PatchError::Unsigned { .. })));
        let other = SigningKeyFile::generate().expect("key");
        assert!(matches!(
            bundle.verify(&TrustedKeys::new(vec![other.public()])),
            Err(PatchError::UntrustedSigner { .. })
        ));

        // Change one byte of a module source: the digest check catches it.
        let mut bytes = bundle.encode();
        let pos = bytes.windows(6).position(|w| w == b"return").expect("source in bundle");
        bytes[pos] = b'R';
        assert!(matches!(Bundle::decode(&bytes, &Limits::default()), Err(PatchError::DigestMismatch { .. })));
    }

    #[test]
    fn refuses_truncation_garbage_and_oversize() {
        let (bundle, _) = signed();
        let bytes = bundle.encode();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            assert!(Bundle::decode(&bytes[..cut], &Limits::default()).is_err(), "accepted {cut} bytes");
        }
        assert!(matches!(Bundle::decode(b"garbage!garbage", &Limits::default()), Err(PatchError::NotABundle)));
        let tight = Limits { max_bundle_bytes: 10, ..Limits::default() };
        assert!(matches!(Bundle::decode(&bytes, &tight), Err(PatchError::TooLarge { .. })));
    }

    #[test]
    fn refuses_module_outside_package() {
        let err = Bundle::create(manifest(), vec![("os".into(), "x=1".into())]).expect_err("outside");
        assert!(err.to_string().contains("outside"), "{err}");
    }
}
