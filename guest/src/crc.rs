//! Software CRC32C (Castagnoli, reflected, init and final XOR 0xffffffff):
//! the reference the tool checks the device's results against.

const POLY: u32 = 0x82f6_3b78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_continue(0, data)
}

/// The CRC32C of `before || data`, given `prior`, the CRC32C of `before`.
pub fn crc32c_continue(prior: u32, data: &[u8]) -> u32 {
    let mut c = !prior;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // RFC 3720 appendix B.4 check value and test vectors.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c_continue(crc32c(b"1234"), b"56789"), 0xe306_9283);
    }
}
