//! The key's location from configuration and URIs, and EC points as tokens give them.

use super::*;

fn config(uri: Option<&str>) -> Pkcs11Config {
    Pkcs11Config {
        uri: uri.map(str::to_string),
        ..Pkcs11Config::default()
    }
}

#[test]
fn a_uri_names_module_token_key_and_pin_file() {
    let location = KeyLocation::from_config(&config(Some(
        "pkcs11:token=payra%20ca;object=issuing;id=%01%a2;type=private\
         ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/payra/pin",
    )))
    .unwrap();
    assert_eq!(
        location.module,
        PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
    );
    assert_eq!(location.token, TokenRef::Label("payra ca".into()));
    assert_eq!(location.key_label.as_deref(), Some("issuing"));
    assert_eq!(location.key_id, Some(vec![0x01, 0xa2]));
    assert_eq!(location.pin_file, Some(PathBuf::from("/etc/payra/pin")));
}

#[test]
fn fields_and_uri_combine_and_disagreements_are_refused() {
    let mut both = config(Some("pkcs11:token=a;object=k"));
    both.module = Some("/m.so".into());
    let location = KeyLocation::from_config(&both).unwrap();
    assert_eq!(location.module, PathBuf::from("/m.so"));
    both.token_label = Some("b".into());
    let refused = KeyLocation::from_config(&both).unwrap_err().to_string();
    assert!(refused.contains("token_label"), "{refused}");

    for (uri, why) in [
        (
            "pkcs11:token=a;object=k?module-path=/m.so&pin-value=1234",
            "pin-value",
        ),
        (
            "pkcs11:token=a;object=k;type=public?module-path=/m.so",
            "private",
        ),
        ("pkcs11:token=a;token=b;object=k?module-path=/m.so", "twice"),
        (
            "pkcs11:token=a;object=k;slot-id=3?module-path=/m.so",
            "slot-id",
        ),
        ("pkcs11:token=a;id=%zz?module-path=/m.so", "escape"),
        ("pkcs11:token=a;id=%+f?module-path=/m.so", "escape"),
        (
            "pkcs11:token=a;object=k?module-path=/m.so&module-path=/n.so",
            "twice",
        ),
        (
            "pkcs11:token=a;object=k?module-path=/m.so&pin-source=file://host/p",
            "absolute",
        ),
        ("pkcs11:object=k?module-path=/m.so", "name the token"),
        ("pkcs11:token=a?module-path=/m.so", "name the key"),
        ("pkcs11:token=a;object=k", "module"),
        (
            "pkcs11:token=a;object=k?module-path=/m.so&pin-source=pin.txt",
            "absolute",
        ),
        ("file:token=a", "pkcs11:"),
        ("pkcs11:token=a;token=b;object=k?module-path=/m.so", "twice"),
        ("pkcs11:token=a;object=k?module-path", "has no value"),
    ] {
        let refused = KeyLocation::from_config(&config(Some(uri)))
            .expect_err(uri)
            .to_string();
        assert!(refused.contains(why), "{uri}: {refused}");
    }
}

#[test]
fn ec_points_are_read_wrapped_or_bare() {
    let mut point = vec![0x04];
    point.extend([0x3f; 64]);
    assert_eq!(sec1_from_ec_point(&point), Some(point.clone()));
    let mut wrapped = vec![0x04, 0x41];
    wrapped.extend(&point);
    assert_eq!(sec1_from_ec_point(&wrapped), Some(point.clone()));
    assert_eq!(sec1_from_ec_point(&point[..33]), None, "compressed");
    assert_eq!(sec1_from_ec_point(&[0x04, 0x01, 0x04]), None);
}
