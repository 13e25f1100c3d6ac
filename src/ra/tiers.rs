//! The PBOC limit-tier engine: pure code, no I/O.
//!
//! Sources: 银发〔2017〕296号《条码支付业务规范（试行）》 (tiers and limits for barcode payments) and
//! 《非银行支付机构网络支付业务管理办法》 (PBOC announcement 2015 No. 43) Art. 22 (the three factor
//! categories) and Art. 24 (limits by verification strength). docs/tiers.md has the table and
//! worked examples.

use std::collections::BTreeSet;

use crate::attestation::CertificateFactor;

pub use crate::model::{Factor, FactorCategory, Scene, Tier};

/// Method names whose category is not in doubt (43号 Art. 22), as payment services commonly
/// name them; docs/tiers.md lists them. Matching ignores case and treats `-` and spaces as `_`.
const KNOWN_METHODS: &[(&str, FactorCategory)] = &[
    ("payment_pin", FactorCategory::Knowledge),
    ("pin", FactorCategory::Knowledge),
    ("password", FactorCategory::Knowledge),
    ("static_password", FactorCategory::Knowledge),
    ("passcode", FactorCategory::Knowledge),
    ("sms_otp", FactorCategory::Possession),
    ("otp", FactorCategory::Possession),
    ("totp", FactorCategory::Possession),
    ("hotp", FactorCategory::Possession),
    ("email_otp", FactorCategory::Possession),
    ("hardware_token", FactorCategory::Possession),
    ("usb_key", FactorCategory::Possession),
    ("digital_certificate", FactorCategory::Possession),
    ("electronic_signature", FactorCategory::Possession),
    ("fingerprint", FactorCategory::Inherence),
    ("face", FactorCategory::Inherence),
    ("face_id", FactorCategory::Inherence),
    ("touch_id", FactorCategory::Inherence),
    ("voice", FactorCategory::Inherence),
    ("iris", FactorCategory::Inherence),
    ("palm", FactorCategory::Inherence),
];

/// The category of a well-known factor method name, or `None` for a name payra does not know
/// (the service's category then stands).
pub fn known_method_category(method: &str) -> Option<FactorCategory> {
    if method.len() > 32 {
        return None;
    }
    let normalized: String = method
        .trim()
        .chars()
        .map(|c| match c {
            '-' | ' ' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    KNOWN_METHODS
        .iter()
        .find(|(name, _)| *name == normalized)
        .map(|(_, category)| *category)
}

/// The first factor whose reported category contradicts its well-known method name, with the
/// category that name has. An SMS OTP reported as knowledge would turn certificate + OTP (one
/// category, tier C) into tier A.
pub fn contradicting_factor(factors: &[Factor]) -> Option<(&Factor, FactorCategory)> {
    factors.iter().find_map(|factor| {
        known_method_category(&factor.method)
            .filter(|known| *known != factor.category)
            .map(|known| (factor, known))
    })
}

/// The tier decision and the categories it counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierDecision {
    pub tier: Tier,
    pub categories: BTreeSet<FactorCategory>,
}

/// Decides the tier.
///
/// `certificate` is what a `VERIFIED` device signature under a valid, unrevoked payra
/// certificate counts for (by its key's attestation and the policy): `Certificate` and
/// `Possession` add the possession category, `NotCounted` (no verified signature, or below
/// the policy's `tier_b`) adds nothing. The service's factors add their categories (a second
/// possession factor such as an SMS OTP adds nothing new). Static barcode is D whatever the
/// factors; otherwise A needs tier A's certificate and two or more categories, B two or more
/// categories without it, and everything else is C.
pub fn decide_tier(
    certificate: CertificateFactor,
    factors: &[Factor],
    scene: Scene,
) -> TierDecision {
    let mut categories: BTreeSet<FactorCategory> = factors.iter().map(|f| f.category).collect();
    if certificate != CertificateFactor::NotCounted {
        categories.insert(FactorCategory::Possession);
    }
    let tier = if scene == Scene::StaticBarcode {
        Tier::D
    } else if categories.len() >= 2 && certificate == CertificateFactor::Certificate {
        Tier::A
    } else if categories.len() >= 2 {
        Tier::B
    } else {
        Tier::C
    };
    TierDecision { tier, categories }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FactorCategory::*;

    fn factors(categories: &[FactorCategory]) -> Vec<Factor> {
        categories
            .iter()
            .map(|c| Factor {
                category: *c,
                method: format!("{c:?}").to_lowercase(),
            })
            .collect()
    }

    /// The reference rule, written independently of `decide_tier`'s branches: count the
    /// distinct categories, then read the BRIEF's table top to bottom.
    fn expected(cert: CertificateFactor, service: &[FactorCategory], scene: Scene) -> Tier {
        let mut distinct: Vec<FactorCategory> = service.to_vec();
        if cert != CertificateFactor::NotCounted {
            distinct.push(Possession);
        }
        distinct.sort();
        distinct.dedup();
        let tier_a_certificate = cert == CertificateFactor::Certificate;
        match (scene, distinct.len(), tier_a_certificate) {
            (Scene::StaticBarcode, _, _) => Tier::D,
            (_, n, true) if n >= 2 => Tier::A,
            (_, n, false) if n >= 2 => Tier::B,
            _ => Tier::C,
        }
    }

    #[test]
    fn every_combination_of_categories_and_scenes() {
        let all = [Knowledge, Possession, Inherence];
        let scenes = [
            Scene::InApp,
            Scene::DynamicBarcode,
            Scene::StaticBarcode,
            Scene::Online,
        ];
        let mut cases = 0;
        // Every multiset of up to two factors per category (0..=2 each), with and without
        // the certificate, in every scene.
        for k in 0..=2 {
            for p in 0..=2 {
                for i in 0..=2 {
                    let mut service = Vec::new();
                    service.extend(std::iter::repeat_n(all[0], k));
                    service.extend(std::iter::repeat_n(all[1], p));
                    service.extend(std::iter::repeat_n(all[2], i));
                    for cert in [
                        CertificateFactor::NotCounted,
                        CertificateFactor::Possession,
                        CertificateFactor::Certificate,
                    ] {
                        for scene in scenes {
                            let decision = decide_tier(cert, &factors(&service), scene);
                            assert_eq!(
                                decision.tier,
                                expected(cert, &service, scene),
                                "cert={cert:?} service={service:?} scene={scene:?}"
                            );
                            assert_eq!(
                                decision.categories.contains(&Possession),
                                cert != CertificateFactor::NotCounted || p > 0
                            );
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 27 * 3 * 4);
    }

    #[test]
    fn known_methods_have_their_category_and_contradictions_are_found() {
        assert_eq!(known_method_category("SMS-OTP"), Some(Possession));
        assert_eq!(known_method_category("payment pin"), Some(Knowledge));
        assert_eq!(known_method_category("Face_ID"), Some(Inherence));
        assert_eq!(known_method_category("bank_card_cvv"), None);
        let honest = factors(&[Knowledge]);
        assert!(
            contradicting_factor(&honest).is_none(),
            "method \"knowledge\" is unknown"
        );
        let lying = vec![
            Factor {
                category: Knowledge,
                method: "payment_pin".into(),
            },
            Factor {
                category: Knowledge,
                method: "sms_otp".into(),
            },
        ];
        let (factor, known) = contradicting_factor(&lying).expect("sms_otp is possession");
        assert_eq!((factor.method.as_str(), known), ("sms_otp", Possession));
        let unknown = vec![Factor {
            category: Inherence,
            method: "vendor_liveness_v2".into(),
        }];
        assert!(contradicting_factor(&unknown).is_none());
    }

    #[test]
    fn worked_examples_from_the_brief() {
        let table = [
            (
                "ok/cert+sms_otp is one category",
                true,
                vec![Possession],
                Scene::InApp,
                Tier::C,
            ),
            ("ok/cert+pin", true, vec![Knowledge], Scene::InApp, Tier::A),
            (
                "ok/cert+fingerprint",
                true,
                vec![Inherence],
                Scene::Online,
                Tier::A,
            ),
            (
                "ok/pin+sms_otp",
                false,
                vec![Knowledge, Possession],
                Scene::InApp,
                Tier::B,
            ),
            ("ok/pin only", false, vec![Knowledge], Scene::InApp, Tier::C),
            ("ok/cert only", true, vec![], Scene::DynamicBarcode, Tier::C),
            (
                "ok/static code",
                true,
                vec![Knowledge, Inherence],
                Scene::StaticBarcode,
                Tier::D,
            ),
            ("ok/nothing", false, vec![], Scene::Online, Tier::C),
        ];
        for (name, cert, service, scene, tier) in table {
            let cert = if cert {
                CertificateFactor::Certificate
            } else {
                CertificateFactor::NotCounted
            };
            assert_eq!(
                decide_tier(cert, &factors(&service), scene).tier,
                tier,
                "{name}"
            );
        }
    }
}
