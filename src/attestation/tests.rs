//! The real attestation samples in tests/data/attestation (see its README): five Android
//! chains and two App Attest objects, each checked at a fixed time inside the window in which
//! every certificate of its chain is valid. Refusals built from generated chains run end to
//! end in tests/attestation.rs.

use super::attestor::is_aosp_software_key;
use super::*;
use proptest::prelude::*;

fn data(path: &str) -> Vec<u8> {
    let full = format!(
        "{}/tests/data/attestation/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

fn meta(sample: &str) -> serde_json::Value {
    serde_json::from_slice(&data(&format!("{sample}/meta.json"))).unwrap()
}

fn unix(text: &str) -> i64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

/// The middle of the window in which the whole chain is valid, and its two ends.
fn window(meta: &serde_json::Value) -> (i64, i64, i64) {
    let from = unix(meta["all_certs_valid_between"]["from"].as_str().unwrap());
    let to = unix(meta["all_certs_valid_between"]["to"].as_str().unwrap());
    (from, from + (to - from) / 2, to)
}

fn android_chain(sample: &str) -> Vec<Vec<u8>> {
    pem::parse_many(data(&format!("{sample}/chain.pem")))
        .unwrap()
        .into_iter()
        .map(|block| block.into_contents())
        .collect()
}

fn leaf_point(chain: &[Vec<u8>]) -> Vec<u8> {
    let parsed = chain::parse(chain).unwrap();
    parsed[0].public_key().subject_public_key.data.to_vec()
}

fn challenge_of(meta: &serde_json::Value) -> Vec<u8> {
    hex::decode(
        meta["key_description"]["attestationChallenge_hex"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

/// Whether `class` meets `requirement` under the default policy, asking for a verified boot
/// or not.
fn meets(
    requirement: Requirement,
    class: AttestationClass,
    verified_boot: bool,
) -> Result<(), String> {
    AttestationPolicy {
        require_verified_boot: verified_boot,
        ..AttestationPolicy::default()
    }
    .check(requirement, class)
}

/// Google's roots as shipped, plus the AOSP software root where it belongs (trusted for
/// software-level attestation only).
fn android_attestor(with_software_root: bool) -> Attestor {
    let mut config = AttestationConfig::default();
    if with_software_root {
        config.android_software_roots.push(
            format!(
                "{}/tests/data/attestation/android/roots/android-software-ec-root.pem",
                env!("CARGO_MANIFEST_DIR")
            )
            .into(),
        );
    }
    Attestor::from_config(&config).unwrap()
}

#[test]
fn every_real_android_chain_verifies_with_its_facts_at_a_time_inside_its_window() {
    let expected = [
        (
            "tee-ec-1",
            SecurityLevel::TrustedEnvironment,
            Some(BootState::Verified),
            Some(true),
            "google-hardware-ec-ca1",
        ),
        (
            "strongbox-ec-1",
            SecurityLevel::StrongBox,
            Some(BootState::Verified),
            Some(true),
            "google-hardware-ec-ca1",
        ),
        (
            "tee-ec-2",
            SecurityLevel::TrustedEnvironment,
            Some(BootState::Verified),
            Some(true),
            "google-hardware-rsa-root",
        ),
        (
            "tee-ec-3",
            SecurityLevel::TrustedEnvironment,
            Some(BootState::Unverified),
            Some(false),
            "google-hardware-rsa-root",
        ),
    ];
    let attestor = android_attestor(false);
    for (name, level, boot, locked, root) in expected {
        let sample = format!("android/{name}");
        let meta = meta(&sample);
        let chain = android_chain(&sample);
        let (_, middle, _) = window(&meta);
        let attestation = attestor
            .android(&chain, &challenge_of(&meta), &leaf_point(&chain), middle)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(attestation.platform, Platform::Android, "{name}");
        assert_eq!(attestation.security_level, level, "{name}");
        assert_eq!(attestation.boot_state, boot, "{name}");
        assert_eq!(attestation.device_locked, locked, "{name}");
        assert_eq!(attestation.root, root, "{name}");
        let package = meta["key_description"]["softwareEnforced"]["attestationApplicationId"]
            ["packages"][0]["package_name"]
            .as_str()
            .unwrap();
        assert_eq!(attestation.apps, vec![package.to_string()], "{name}");
        // The RSA root's key is what is trusted: the chains ending at its 2016 and 2019
        // certificates verify against the shipped 2022 one.
        assert_eq!(
            attestation.root_key_sha256.len(),
            64,
            "{name}: the root key's SHA-256"
        );
    }
}

#[test]
fn a_tee_chain_with_a_verified_boot_meets_hardware_and_an_unlocked_one_does_not() {
    let attestor = android_attestor(false);
    let class_of = |name: &str| {
        let sample = format!("android/{name}");
        let meta = meta(&sample);
        let chain = android_chain(&sample);
        attestor
            .android(
                &chain,
                &challenge_of(&meta),
                &leaf_point(&chain),
                window(&meta).1,
            )
            .unwrap()
            .class()
    };
    assert_eq!(
        meets(Requirement::Hardware, class_of("tee-ec-1"), true),
        Ok(())
    );
    assert_eq!(
        meets(Requirement::Strongbox, class_of("strongbox-ec-1"), true),
        Ok(())
    );
    let tee_refusal = meets(Requirement::Strongbox, class_of("tee-ec-1"), true).unwrap_err();
    assert!(
        tee_refusal.contains("strongbox is required"),
        "{tee_refusal}"
    );
    let unlocked = meets(Requirement::Hardware, class_of("tee-ec-3"), true).unwrap_err();
    assert!(unlocked.contains("verified, locked"), "{unlocked}");
    // An operator who does not ask for a verified boot accepts it.
    assert_eq!(
        meets(Requirement::Hardware, class_of("tee-ec-3"), false),
        Ok(())
    );
}

#[test]
fn the_software_chain_needs_its_root_configured_and_is_only_software() {
    let sample = "android/software-ec-1";
    let meta = meta(sample);
    let chain = android_chain(sample);
    let (_, middle, _) = window(&meta);
    let refused = android_attestor(false)
        .android(&chain, &challenge_of(&meta), &leaf_point(&chain), middle)
        .unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::UnknownRoot(_)),
        "{refused:?}"
    );
    let attestation = android_attestor(true)
        .android(&chain, &challenge_of(&meta), &leaf_point(&chain), middle)
        .unwrap();
    assert_eq!(attestation.security_level, SecurityLevel::Software);
    assert_eq!(attestation.boot_state, None);
    let class = attestation.class();
    assert_eq!(meets(Requirement::Any, class, true), Ok(()));
    let refusal = meets(Requirement::Hardware, class, true).unwrap_err();
    assert!(
        refusal.contains("software; hardware is required"),
        "{refusal}"
    );
}

#[test]
fn a_real_chain_is_refused_outside_its_window_for_another_challenge_or_another_key() {
    let sample = "android/tee-ec-1";
    let meta = meta(sample);
    let chain = android_chain(sample);
    let (from, middle, to) = window(&meta);
    let attestor = android_attestor(false);
    let (challenge, key) = (challenge_of(&meta), leaf_point(&chain));
    for at in [from - 1, to + 1] {
        let refused = attestor.android(&chain, &challenge, &key, at).unwrap_err();
        assert!(
            matches!(refused, AttestationRefusal::Expired(_)),
            "{refused:?}"
        );
    }
    let refused = attestor
        .android(&chain, b"another enrollment", &key, middle)
        .unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::WrongChallenge(_)),
        "{refused:?}"
    );
    let other_key = crate::client::DeviceKey::generate();
    let other_point = crate::ca::parse_device_csr(&other_key.csr_der("other").unwrap())
        .unwrap()
        .point()
        .to_vec();
    let refused = attestor
        .android(&chain, &challenge, &other_point, middle)
        .unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::KeyMismatch(_)),
        "{refused:?}"
    );
    // Without Google's roots nothing is trusted.
    let bare = Attestor::from_config(&AttestationConfig {
        google_roots: false,
        ..AttestationConfig::default()
    })
    .unwrap();
    let refused = bare.android(&chain, &challenge, &key, middle).unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::UnknownRoot(_)),
        "{refused:?}"
    );
}

#[test]
fn the_status_list_refuses_a_listed_certificate_in_a_real_chain() {
    let status = StatusList::parse(&data("android/status/status.json")).unwrap();
    assert_eq!(status.len(), 5);
    let suspended = pem::parse(data("android/status/suspended-cert.pem")).unwrap();
    let suspended = [suspended.into_contents()];
    let parsed = chain::parse(&suspended).unwrap();
    let key = chain::status_key(&parsed[0]);
    assert_eq!(key, "cc66e9a93713b6e643b26c15879786f7");
    assert_eq!(status.get(&key), Some("SUSPENDED"));

    // The published list names none of the samples; list tee-ec-1's Droid CA3.
    let sample = "android/tee-ec-1";
    let meta = meta(sample);
    let chain = android_chain(sample);
    let ca3 = chain::status_key(&chain::parse(&chain).unwrap()[2]);
    let mut attestor = android_attestor(false);
    attestor.status = Some(std::sync::Arc::new(StatusSource::fixed(status)));
    attestor
        .android(
            &chain,
            &challenge_of(&meta),
            &leaf_point(&chain),
            window(&meta).1,
        )
        .unwrap();
    let listed = format!(
        r#"{{"entries": {{"{ca3}": {{"status": "REVOKED", "reason": "KEY_COMPROMISE"}}}}}}"#
    );
    attestor.status = Some(std::sync::Arc::new(StatusSource::fixed(
        StatusList::parse(listed.as_bytes()).unwrap(),
    )));
    let refused = attestor
        .android(
            &chain,
            &challenge_of(&meta),
            &leaf_point(&chain),
            window(&meta).1,
        )
        .unwrap_err();
    assert_eq!(
        refused,
        AttestationRefusal::Revoked {
            serial: ca3,
            status: "REVOKED".into()
        }
    );
}

fn apple_sample(name: &str) -> (Vec<u8>, serde_json::Value, [u8; 32]) {
    let sample = format!("apple/{name}");
    let meta = meta(&sample);
    let hash: [u8; 32] = hex::decode(meta["client_data_hash_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    (data(&format!("{sample}/attestation.cbor")), meta, hash)
}

fn apple_attestor(app_id: &str, development: bool) -> Attestor {
    Attestor::from_config(&AttestationConfig {
        apple_app_ids: vec![app_id.to_string()],
        apple_development: development,
        ..AttestationConfig::default()
    })
    .unwrap()
}

#[test]
fn both_real_app_attest_objects_verify_to_apples_root_with_their_app_and_client_data() {
    for (name, development) in [("sample-1", true), ("sample-2", false)] {
        let (object, meta, hash) = apple_sample(name);
        let app_id = meta["app_id"].as_str().unwrap();
        let (_, middle, _) = window(&meta);
        let attestation = apple_attestor(app_id, development)
            .apple(&object, &hash, middle)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(attestation.platform, Platform::Apple);
        assert_eq!(attestation.security_level, SecurityLevel::SecureEnclave);
        assert_eq!(attestation.apps, vec![app_id.to_string()]);
        assert_eq!(attestation.root, "apple-app-attestation-root");
        assert_eq!(
            meets(Requirement::Hardware, attestation.class(), true),
            Ok(())
        );
        assert!(meets(Requirement::Strongbox, attestation.class(), true).is_err());
        let decoded = apple::decode(&object).unwrap();
        let leaf = chain::parse(&decoded.x5c).unwrap();
        let key_id = apple::check(&decoded, &leaf[0], &hash, &[app_id.to_string()], true)
            .unwrap()
            .key_id;
        assert_eq!(hex::encode(key_id), meta["key_id_hex"].as_str().unwrap());
    }
}

#[test]
fn a_real_app_attest_object_is_refused_for_other_client_data_another_app_or_development() {
    let (object, meta, hash) = apple_sample("sample-1");
    let app_id = meta["app_id"].as_str().unwrap();
    let (from, middle, to) = window(&meta);
    let refused = apple_attestor(app_id, true)
        .apple(&object, &[7; 32], middle)
        .unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::WrongChallenge(_)),
        "{refused:?}"
    );
    let refused = apple_attestor("ABCDE12345.com.example.pay", true)
        .apple(&object, &hash, middle)
        .unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::UnknownApp(_)),
        "{refused:?}"
    );
    let refused = apple_attestor(app_id, false)
        .apple(&object, &hash, middle)
        .unwrap_err();
    assert!(
        matches!(&refused, AttestationRefusal::UnknownApp(m) if m.contains("development")),
        "{refused:?}"
    );
    for at in [from - 1, to + 1] {
        let refused = apple_attestor(app_id, true)
            .apple(&object, &hash, at)
            .unwrap_err();
        assert!(
            matches!(refused, AttestationRefusal::Expired(_)),
            "{refused:?}"
        );
    }
    let none = Attestor::default()
        .apple(&object, &hash, middle)
        .unwrap_err();
    assert!(
        matches!(none, AttestationRefusal::NotConfigured(_)),
        "{none:?}"
    );
}

/// The vectors docs/attestation.md gives SDK authors, computed there with Python's hashlib.
#[test]
fn the_challenge_and_client_data_are_the_documented_vectors() {
    let token = "payra_et_3f1c9a0e5b7d2468ace013579bdf2468";
    assert_eq!(
        hex::encode(challenge(token)),
        "b4bb2ef488f3d978a7552fe9bed80cad0d0f664d5cf0f2414b6e186423eb34d8"
    );
    // A payment key point 04 01 02 ... 40 (65 bytes).
    let mut point = [0u8; 65];
    point[0] = 4;
    for (i, byte) in point.iter_mut().enumerate().skip(1) {
        *byte = i as u8;
    }
    let data = apple_client_data(token, &point);
    assert_eq!(
        hex::encode(&data),
        "b4bb2ef488f3d978a7552fe9bed80cad0d0f664d5cf0f2414b6e186423eb34d8\
         0ed3a6ab957ff6f59a9630a473d31a7d04fcb46548b89016196980c7e96584f6"
    );
    assert_eq!(
        hex::encode(Sha256::digest(&data)),
        "268bcf6074a4d5a5ae6fa24f7e40def2fdc44aa0e595a83e7e3169d1d70b80fe"
    );
}

#[test]
fn the_policy_counts_a_certificate_by_its_class() {
    let policy = AttestationPolicy {
        tier_a: Requirement::Hardware,
        tier_b: Requirement::Any,
        require_verified_boot: true,
        app_attest_as_hardware: true,
    };
    let hardware = AttestationClass::new(Some(SecurityLevel::TrustedEnvironment), true);
    let software = AttestationClass::new(Some(SecurityLevel::Software), false);
    assert_eq!(
        policy.factor(hardware),
        (CertificateFactor::Certificate, None)
    );
    let (factor, why) = policy.factor(software);
    assert_eq!(factor, CertificateFactor::Possession);
    assert!(why.unwrap().contains("software; hardware is required"));
    let (factor, why) = policy.factor(AttestationClass::NONE);
    assert_eq!(factor, CertificateFactor::NotCounted);
    assert!(why.unwrap().contains("not attested"));
    // The default policy counts every certificate, as payra did before attestation.
    assert_eq!(
        AttestationPolicy::default().factor(AttestationClass::NONE),
        (CertificateFactor::Certificate, None)
    );
    // tier_b may not be stricter than tier_a.
    let strict_b = AttestationConfig {
        tier_a: Requirement::Any,
        tier_b: Requirement::Hardware,
        ..AttestationConfig::default()
    };
    assert!(strict_b.validate().is_err());
}

fn real_key_description() -> Vec<u8> {
    let chain = android_chain("android/tee-ec-1");
    let parsed = chain::parse(&chain).unwrap();
    let oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 4, 1, 11129, 2, 1, 17]).unwrap();
    parsed[0]
        .extensions()
        .iter()
        .find(|e| e.oid == oid)
        .unwrap()
        .value
        .to_vec()
}

#[test]
fn the_real_key_description_parses_to_its_documented_fields() {
    let description = android::parse_key_description(&real_key_description()).unwrap();
    assert_eq!(description.attestation_version, 400);
    assert_eq!(
        description.attestation_security_level,
        SecurityLevel::TrustedEnvironment
    );
    assert_eq!(
        description.keymint_security_level,
        SecurityLevel::TrustedEnvironment
    );
    assert_eq!(
        description.challenge,
        b"6417f92c-daef-4cc1-8828-5bb39338ffd5"
    );
    assert_eq!(description.purposes, vec![2, 3]);
    assert_eq!(description.origin, Some(0));
    assert_eq!(
        hex::encode(&description.signature_digests[0]),
        "103938ee4537e59e8ee792f654504fb8346fc6b346d0bbc4415fc339fcfc8ec1"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_key_description_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = android::parse_key_description(&bytes);
    }

    #[test]
    fn a_damaged_real_key_description_is_refused_or_read_without_panic(
        at in 0usize..4096, value in any::<u8>(), cut in 0usize..4096,
    ) {
        let mut bytes = real_key_description();
        let at = at % bytes.len();
        bytes[at] = value;
        bytes.truncate(cut.max(1));
        let _ = android::parse_key_description(&bytes);
    }

    #[test]
    fn no_app_attest_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = apple::decode(&bytes);
    }

    #[test]
    fn a_damaged_real_app_attest_object_is_refused_without_panic(
        at in 0usize..8192, value in any::<u8>(),
    ) {
        let (mut object, meta, hash) = apple_sample("sample-2");
        let at = at % object.len();
        let changed = object[at] != value;
        object[at] = value;
        let attestor = apple_attestor(meta["app_id"].as_str().unwrap(), false);
        let result = attestor.apple(&object, &hash, window(&meta).1);
        // Only what no signature covers may change and still be accepted: the receipt (not
        // checked here), and the envelope of a certificate (the outer tags, the copy of the
        // signature algorithm outside the signed part).
        if changed && result.is_ok() {
            let original = apple::decode(&apple_sample("sample-2").0).unwrap();
            let decoded = apple::decode(&object).unwrap();
            let signed = |o: &apple::AttestationObject| {
                let chain = chain::parse(&o.x5c).unwrap();
                chain
                    .iter()
                    .map(|c| (c.tbs_certificate.as_ref().to_vec(), c.signature_value.data.to_vec()))
                    .collect::<Vec<_>>()
            };
            let receipt_only = decoded.auth_data == original.auth_data
                && signed(&decoded) == signed(&original);
            prop_assert!(receipt_only, "a changed byte at {} was accepted", at);
        }
    }
}

/// A certificate anyone can write: `spki_der`'s key, signed by a throwaway key, with
/// `extension` (OID, value) if given.
fn forged_certificate(spki_der: &[u8], extension: Option<(&[u64], Vec<u8>)>) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    if let Some((oid, value)) = extension {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(oid, value));
    }
    let issuer = rcgen::Issuer::new(
        rcgen::CertificateParams::new(vec![]).unwrap(),
        rcgen::KeyPair::generate().unwrap(),
    );
    params
        .signed_by(
            &rcgen::SubjectPublicKeyInfo::from_der(spki_der).unwrap(),
            &issuer,
        )
        .unwrap()
        .der()
        .to_vec()
}

#[test]
fn a_certificate_bearing_an_anchors_key_is_never_the_leaf() {
    let attestor = apple_attestor("ABCDE12345.com.example.pay", false);
    let apple_root = &attestor.apple_anchors[0];
    // The attack: one certificate carrying Apple's root key and a nonce the attacker chose.
    let nonce = [0x30, 0x24, 0xa1, 0x22, 0x04, 0x20]
        .iter()
        .copied()
        .chain([7u8; 32])
        .collect();
    let forged = forged_certificate(
        &apple_root.spki_der,
        Some((&[1, 2, 840, 113635, 100, 8, 2], nonce)),
    );
    let alone = [forged.clone()];
    let parsed = chain::parse(&alone).unwrap();
    let refused = chain::verify(&parsed, &attestor.apple_anchors, 1_800_000_000, None).unwrap_err();
    assert!(
        matches!(&refused, AttestationRefusal::Malformed(m) if m.contains("only a certificate bearing")),
        "{refused:?}"
    );
    // Below a presented anchor certificate, a leaf must verify under the anchor's key.
    let (object, meta, _) = apple_sample("sample-2");
    let real = apple::decode(&object).unwrap();
    let leaf_spki = chain::parse(&real.x5c).unwrap()[0]
        .public_key()
        .raw
        .to_vec();
    let pair = [forged_certificate(&leaf_spki, None), forged];
    let parsed = chain::parse(&pair).unwrap();
    let refused =
        chain::verify(&parsed, &attestor.apple_anchors, window(&meta).1, None).unwrap_err();
    assert!(
        matches!(refused, AttestationRefusal::BadChain(_)),
        "{refused:?}"
    );
    // And an App Attest object must hold exactly the credential certificate and Apple's
    // intermediate.
    let mut one = object.clone();
    let decoded = apple::decode(&one).unwrap();
    let single = ciborium::Value::Map(vec![
        (
            ciborium::Value::Text("fmt".into()),
            ciborium::Value::Text("apple-appattest".into()),
        ),
        (
            ciborium::Value::Text("attStmt".into()),
            ciborium::Value::Map(vec![(
                ciborium::Value::Text("x5c".into()),
                ciborium::Value::Array(vec![ciborium::Value::Bytes(decoded.x5c[0].clone())]),
            )]),
        ),
        (
            ciborium::Value::Text("authData".into()),
            ciborium::Value::Bytes(decoded.auth_data),
        ),
    ]);
    one.clear();
    ciborium::ser::into_writer(&single, &mut one).unwrap();
    let refused = attestor.apple(&one, &[0; 32], window(&meta).1).unwrap_err();
    assert!(
        matches!(&refused, AttestationRefusal::Malformed(m) if m.contains("not 2")),
        "{refused:?}"
    );
}

#[test]
fn aosps_software_root_is_trusted_for_software_only() {
    let root = format!(
        "{}/tests/data/attestation/android/roots/android-software-ec-root.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    let refused = Attestor::from_config(&AttestationConfig {
        android_roots: vec![root.clone().into()],
        ..AttestationConfig::default()
    })
    .unwrap_err();
    assert!(
        refused.to_string().contains("android_software_roots"),
        "{refused}"
    );
    let attestor = android_attestor(true);
    let anchor = attestor
        .android_anchors
        .iter()
        .find(|a| a.name == root)
        .unwrap();
    assert!(anchor.software_only);
}

#[test]
fn status_keys_are_compared_as_javas_biginteger_writes_them() {
    assert_eq!(chain::normalise_status_key("00Ab12"), "ab12");
    assert_eq!(chain::normalise_status_key("-00ff"), "-ff");
    assert_eq!(chain::normalise_status_key("000"), "0");
    let list = StatusList::parse(br#"{"entries": {"00CC66E9": {"status": "REVOKED"}}}"#).unwrap();
    assert_eq!(list.get("cc66e9"), Some("REVOKED"));
    // Serials as DER writes them: a leading zero keeps a high bit positive; 0xff01 in two's
    // complement is -255.
    assert_eq!(chain::serial_status_key(&[0x00, 0xcc, 0x66]), "cc66");
    assert_eq!(chain::serial_status_key(&[0xff, 0x01]), "-ff");
    assert_eq!(chain::serial_status_key(&[0x80]), "-80");
    assert_eq!(chain::serial_status_key(&[0x00]), "0");
}

#[test]
fn any_accepts_an_unlocked_tee_and_app_attest_can_count_as_software() {
    let unlocked = AttestationClass::new(Some(SecurityLevel::TrustedEnvironment), false);
    assert_eq!(meets(Requirement::Any, unlocked, true), Ok(()));
    assert!(meets(Requirement::Hardware, unlocked, true).is_err());
    let app_attest = AttestationClass::new(Some(SecurityLevel::SecureEnclave), true);
    assert!(app_attest.app_attest());
    assert_eq!(meets(Requirement::Hardware, app_attest, true), Ok(()));
    let software_apple = AttestationPolicy {
        app_attest_as_hardware: false,
        ..AttestationPolicy::default()
    };
    let refusal = software_apple
        .check(Requirement::Hardware, app_attest)
        .unwrap_err();
    assert!(refusal.contains("counts as software"), "{refusal}");
    assert_eq!(software_apple.check(Requirement::Any, app_attest), Ok(()));
    // A package allow-list alone is refused: any app can take a package name.
    let packages_only = AttestationConfig {
        android_packages: vec!["com.example.pay".into()],
        ..AttestationConfig::default()
    };
    assert!(packages_only.validate().is_err());
}

#[test]
fn the_status_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.json");
    let write = |text: &str, age_s: u64| {
        std::fs::write(&path, text).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age_s))
            .unwrap();
    };
    let entry = |serial: &str| format!(r#"{{"entries": {{"{serial}": {{"status": "REVOKED"}}}}}}"#);
    write(&entry("aa"), 60);
    let source = StatusSource::file(&path).unwrap();
    let now = std::time::Duration::ZERO;
    assert_eq!(source.current_within(now).get("aa"), Some("REVOKED"));

    // A new list, one byte longer: read on the next look.
    write(&entry("bbb"), 30);
    let list = source.current_within(now);
    assert_eq!((list.get("bbb"), list.get("aa")), (Some("REVOKED"), None));
    // Within the recheck interval nothing is looked at.
    write(&entry("ccc"), 20);
    assert_eq!(source.current().get("bbb"), Some("REVOKED"));
    // The next look after it reads it (same length, another modification time).
    let list = source.current_within(now);
    assert_eq!(
        list.get("ccc"),
        Some("REVOKED"),
        "a different mtime is a change"
    );
    // A file that no longer parses, or is gone, keeps the last good list.
    write("{ not json", 10);
    assert_eq!(source.current_within(now).get("ccc"), Some("REVOKED"));
    std::fs::remove_file(&path).unwrap();
    assert_eq!(source.current_within(now).get("ccc"), Some("REVOKED"));
    // A bad file at start is an error there.
    write("[]", 60);
    assert!(StatusSource::file(&path).is_err());
}

#[test]
fn a_chain_through_aosps_published_intermediate_key_counts_as_software() {
    // The real software chain, with its intermediate's key: trusted by key from
    // android_software_roots it is software; its EC intermediate's key is AOSP's too.
    let chain = android_chain("android/software-ec-1");
    let parsed = chain::parse(&chain).unwrap();
    assert!(is_aosp_software_key(parsed[1].public_key().raw));
    assert!(is_aosp_software_key(parsed[2].public_key().raw));
    assert!(!is_aosp_software_key(
        chain::parse(&android_chain("android/tee-ec-1")).unwrap()[4]
            .public_key()
            .raw
    ));
    // A key listed both as a hardware and as a software root is refused.
    let root = format!(
        "{}/tests/data/attestation/android/roots/google-hardware-ec-root-ca1.pem",
        env!("CARGO_MANIFEST_DIR")
    );
    let refused = Attestor::from_config(&AttestationConfig {
        android_software_roots: vec![root.into()],
        ..AttestationConfig::default()
    })
    .unwrap_err();
    assert!(
        refused.to_string().contains("list it in one place"),
        "{refused}"
    );
}

#[test]
fn the_attestors_factor_table_answers_as_the_policy_does_for_every_class() {
    let config = AttestationConfig {
        tier_a: Requirement::Strongbox,
        tier_b: Requirement::Any,
        apple_level: AppleLevel::Software,
        ..AttestationConfig::default()
    };
    let attestor = Attestor::from_config(&config).unwrap();
    let policy = AttestationPolicy::of(&config);
    for byte in 0..=u8::MAX {
        let class = AttestationClass(byte);
        let (factor, note) = attestor.factor(class);
        assert_eq!(
            (factor, note.map(|n| n.to_string())),
            policy.factor(class),
            "{byte:#x}"
        );
    }
}
