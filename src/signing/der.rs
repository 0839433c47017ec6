//! Just enough DER to read the integers of a PKCS#8-wrapped RSAPrivateKey,
//! which is how aws-lc exports a generated RSA key.

/// Reads one TLV with the expected tag; returns its contents and the rest.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, r) = rest.split_at(n);
        rest = r;
        bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;

/// `[n, e, d, p, q, dp, dq, qi]`, big-endian without leading zeros.
pub(super) fn rsa_private_key_from_pkcs8(pkcs8: &[u8]) -> Option<[&[u8]; 8]> {
    // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING }
    let (info, _) = tlv(pkcs8, SEQUENCE)?;
    let (_, rest) = tlv(info, INTEGER)?;
    let (_, rest) = tlv(rest, SEQUENCE)?;
    let (private_key, _) = tlv(rest, OCTET_STRING)?;
    // RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, dp, dq, qi }
    let (mut fields, _) = tlv(private_key, SEQUENCE)?;
    let (_, rest) = tlv(fields, INTEGER)?;
    fields = rest;
    let mut out: [&[u8]; 8] = [&[]; 8];
    for slot in &mut out {
        let (int, rest) = tlv(fields, INTEGER)?;
        let start = int.iter().position(|b| *b != 0).unwrap_or(int.len());
        *slot = &int[start..];
        fields = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};

    use super::*;

    #[test]
    fn reads_the_integers_of_a_generated_rsa_key() {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let pkcs8 = pair.as_der().unwrap();
        let [n, e, d, p, q, ..] = rsa_private_key_from_pkcs8(pkcs8.as_ref()).unwrap();
        assert_eq!(e, [1, 0, 1]);
        assert_eq!(n.len(), 256);
        assert_eq!(
            n,
            &pair.public_key().as_ref()[pair.public_key().as_ref().len() - 256 - 5..][..256]
        );
        assert!(!d.is_empty() && p.len() == 128 && q.len() == 128);
    }

    #[test]
    fn malformed_input_is_none_not_a_panic() {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let pkcs8 = pair.as_der().unwrap();
        let bytes = pkcs8.as_ref();
        for cut in [0, 1, 2, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(rsa_private_key_from_pkcs8(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        assert!(rsa_private_key_from_pkcs8(&[0x31, 0x00]).is_none());
        assert!(rsa_private_key_from_pkcs8(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
    }

    /// Lengths at the edges of what DER allows and this reader accepts.
    #[test]
    fn tlv_lengths() {
        // Short form, and long form with exactly the bytes it announces.
        assert_eq!(tlv(&[2, 1, 0xaa, 7], 2), Some((&[0xaa][..], &[7][..])));
        assert_eq!(tlv(&[2, 0x81, 0], 2), Some((&[][..], &[][..])));
        assert_eq!(tlv(&[2, 0x84, 0, 0, 0, 1, 0xaa], 2), Some((&[0xaa][..], &[][..])));
        let long: Vec<u8> = [vec![2, 0x82, 0x01, 0x00], vec![9; 256]].concat();
        assert_eq!(tlv(&long, 2).map(|(v, _)| v.len()), Some(256));
        // BER's indefinite length, more than 4 length bytes, a length
        // longer than the input, a truncated length, a wrong tag.
        assert_eq!(tlv(&[2, 0x80, 0, 0], 2), None);
        // 0x80 is the indefinite length, which DER forbids: never a length of 128.
        let indefinite: Vec<u8> = [2, 0x80].into_iter().chain([0; 200]).collect();
        assert_eq!(tlv(&indefinite, 2), None);
        assert_eq!(tlv(&[2, 0x85, 0, 0, 0, 0, 1, 0xaa], 2), None);
        assert_eq!(tlv(&[2, 2, 0xaa], 2), None);
        assert_eq!(tlv(&[2, 0x82, 0x01], 2), None);
        assert_eq!(tlv(&[3, 1, 0xaa], 2), None);
        assert_eq!(tlv(&[], 2), None);
    }
}
