//! The MSI-X table and Pending Bit Array (PCI 3.0 §6.8.2.6–§6.8.2.10).
//!
//! Plain data, no fds: [`Interrupts`](super::Interrupts) holds one of these
//! under its lock and decides delivery. Accesses of any size and alignment
//! work byte by byte (the spec asks drivers for aligned DWORD/QWORD accesses;
//! we do not refuse others).
//!
//! **Who owns the table.** QEMU and cloud-hypervisor emulate the MSI-X table
//! themselves: their table writes never reach us, and they mask by not
//! signalling (QEMU) or by KVM routing. Our copy of a vector's Mask bit is
//! reset to 1 as the spec says, so honouring it for such a VMM would block
//! every interrupt. The table's mask bits therefore count only once a client
//! has written the table through us (our in-process client does); until then
//! delivery is gated by the MSI-X enable and function-mask bits (which every
//! VMM forwards as config writes) and the VFIO-level per-vector mask. A reset
//! returns the table to VMM-owned.

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Vector Control bit 0.
pub const VECTOR_CTRL_MASKED: u32 = 1;

/// Writable bits of each entry DWORD: the address is DWORD aligned, Vector
/// Control has only the mask bit.
const WORD_WRITABLE: [u32; 4] = [0xffff_fffc, 0xffff_ffff, 0xffff_ffff, VECTOR_CTRL_MASKED];

/// Size in bytes of a table of `vectors` entries.
pub fn table_bytes(vectors: u16) -> u64 {
    u64::from(vectors) * ENTRY_SIZE
}

/// Size in bytes of the PBA for `vectors`: one bit each, in QWORDs.
pub fn pba_bytes(vectors: u16) -> u64 {
    u64::from(vectors).div_ceil(64) * 8
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    pba: Vec<u64>,
    client_owned: bool,
}

impl MsixTable {
    pub fn new(vectors: u16) -> Self {
        MsixTable {
            entries: vec![Self::RESET_ENTRY; usize::from(vectors)],
            pba: vec![0; usize::from(vectors).div_ceil(64)],
            client_owned: false,
        }
    }

    const RESET_ENTRY: [u32; 4] = [0, 0, 0, VECTOR_CTRL_MASKED];

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Every entry masked and zeroed, nothing pending, VMM-owned again.
    pub fn reset(&mut self) {
        self.entries.fill(Self::RESET_ENTRY);
        self.pba.fill(0);
        self.client_owned = false;
    }

    /// Has a client written the table through us (so its mask bits count)?
    pub fn client_owned(&self) -> bool {
        self.client_owned
    }

    /// The vector's table Mask bit as it affects delivery (see the module
    /// doc: false while the VMM owns the table). Out of range: masked.
    pub fn entry_masked(&self, vector: u16) -> bool {
        match self.entries.get(usize::from(vector)) {
            Some(e) => self.client_owned && e[3] & VECTOR_CTRL_MASKED != 0,
            None => true,
        }
    }

    /// (address, data) of an entry, as last written.
    pub fn message(&self, vector: u16) -> Option<(u64, u32)> {
        self.entries
            .get(usize::from(vector))
            .map(|e| (u64::from(e[0]) | (u64::from(e[1]) << 32), e[2]))
    }

    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|q| q & (1 << (v % 64)) != 0)
    }

    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(q) = self.pba.get_mut(v / 64) {
            if pending {
                *q |= 1 << (v % 64);
            } else {
                *q &= !(1 << (v % 64));
            }
        }
    }

    pub fn clear_pending(&mut self) {
        self.pba.fill(0);
    }

    /// The entries' four DWORDs each, as a guest would read them.
    pub fn entries(&self) -> &[[u32; 4]] {
        &self.entries
    }

    /// The PBA's QWORDs.
    pub fn pba_words(&self) -> &[u64] {
        &self.pba
    }

    /// Why `entries` and `pba` could not be this table's contents: the
    /// wrong number of either, a bit no write could set, a pending bit past
    /// the last vector. `None` when they could.
    pub fn check_parts(&self, entries: &[[u32; 4]], pba: &[u64]) -> Option<String> {
        if entries.len() != self.entries.len() {
            return Some(format!(
                "{} MSI-X entries, the function has {}",
                entries.len(),
                self.entries.len()
            ));
        }
        if pba.len() != self.pba.len() {
            return Some(format!(
                "{} PBA words, the function has {}",
                pba.len(),
                self.pba.len()
            ));
        }
        for (v, e) in entries.iter().enumerate() {
            for (w, (word, writable)) in e.iter().zip(WORD_WRITABLE).enumerate() {
                if word & !writable != 0 {
                    return Some(format!(
                        "MSI-X entry {v}, DWORD {w}: {word:#x} sets bits no write can set"
                    ));
                }
            }
        }
        let vectors = self.entries.len();
        for (q, word) in pba.iter().enumerate() {
            let valid = vectors.saturating_sub(q * 64).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            if word & !mask != 0 {
                return Some(format!(
                    "PBA word {q}: {word:#x} marks vectors past the last one"
                ));
            }
        }
        None
    }

    /// Become `entries` and `pba` (checked by [`MsixTable::check_parts`]).
    pub fn restore(&mut self, entries: &[[u32; 4]], pba: &[u64], client_owned: bool) {
        self.entries.copy_from_slice(entries);
        self.pba.copy_from_slice(pba);
        self.client_owned = client_owned;
    }

    /// Read table bytes at `offset` from the table's start. Bytes past the
    /// end read 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(k as u64)
                .and_then(|at| self.word_of(at))
                .and_then(|(e, w, shift)| Some((self.entries.get(e)?.get(w)? >> shift) as u8))
                .unwrap_or(0);
        }
    }

    /// Write table bytes at `offset`. Returns the vectors whose Mask bit went
    /// from 1 to 0, so the caller can deliver their pending messages.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<u16> {
        self.client_owned = true;
        let mut unmasked = Vec::new();
        for (k, b) in data.iter().enumerate() {
            let Some((e, w, shift)) = offset.checked_add(k as u64).and_then(|at| self.word_of(at))
            else {
                continue;
            };
            let (Some(word), Some(writable)) = (
                self.entries.get_mut(e).and_then(|x| x.get_mut(w)),
                WORD_WRITABLE.get(w),
            ) else {
                continue;
            };
            let old = *word;
            let mask = writable & (0xff << shift);
            let new = (old & !mask) | ((u32::from(*b) << shift) & mask);
            *word = new;
            if w == 3 && old & VECTOR_CTRL_MASKED != 0 && new & VECTOR_CTRL_MASKED == 0 {
                unmasked.push(e as u16);
            }
        }
        unmasked
    }

    /// Read PBA bytes at `offset` from the PBA's start (read-only; bytes past
    /// the end read 0).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(k as u64)
                .and_then(|at| {
                    let q = self.pba.get(usize::try_from(at / 8).ok()?)?;
                    Some((q >> (8 * (at % 8))) as u8)
                })
                .unwrap_or(0);
        }
    }

    /// (entry, word, bit shift) of a table byte.
    fn word_of(&self, at: u64) -> Option<(usize, usize, u32)> {
        let e = usize::try_from(at / ENTRY_SIZE).ok()?;
        if e >= self.entries.len() {
            return None;
        }
        let in_entry = (at % ENTRY_SIZE) as usize;
        Some((e, in_entry / 4, 8 * (in_entry % 4) as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(table_bytes(3), 48);
        assert_eq!(pba_bytes(1), 8);
        assert_eq!(pba_bytes(64), 8);
        assert_eq!(pba_bytes(65), 16);
        assert_eq!(pba_bytes(0), 0);
    }

    #[test]
    fn reset_entries_are_masked_and_readable() {
        let t = MsixTable::new(4);
        let mut b = [0u8; 16];
        t.read_table(16, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        // Not client-owned yet: the mask bit does not gate delivery.
        assert!(!t.entry_masked(1));
        assert!(t.entry_masked(4));
    }

    #[test]
    fn writes_respect_reserved_bits_and_report_unmask() {
        let mut t = MsixTable::new(2);
        let mut entry = Vec::new();
        entry.extend_from_slice(&0xfee0_0003u32.to_le_bytes());
        entry.extend_from_slice(&0x1u32.to_le_bytes());
        entry.extend_from_slice(&0x4041u32.to_le_bytes());
        entry.extend_from_slice(&0xffff_fffeu32.to_le_bytes());
        let unmasked = t.write_table(16, &entry);
        assert_eq!(unmasked, vec![1]);
        assert!(t.client_owned());
        assert_eq!(t.message(1), Some((0x1_fee0_0000, 0x4041)));
        let mut ctrl = [0u8; 4];
        t.read_table(16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 0, "reserved control bits stay 0");
        assert!(!t.entry_masked(1));
        assert!(
            t.entry_masked(0),
            "entry 0 is masked now that the client owns the table"
        );
        // Masking again reports nothing; a byte write inside control works.
        assert!(t.write_table(16 + 12, &[1]).is_empty());
        assert!(t.entry_masked(1));
        // Past the end: ignored, reads 0.
        assert!(t.write_table(32, &[0; 16]).is_empty());
        let mut past = [0xaau8; 4];
        t.read_table(30, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
    }

    #[test]
    fn pba_bits() {
        let mut t = MsixTable::new(70);
        t.set_pending(0, true);
        t.set_pending(69, true);
        let mut pba = [0u8; 16];
        t.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba[..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(pba[8..].try_into().unwrap()), 1 << 5);
        let mut b = [0u8; 1];
        t.read_pba(8, &mut b);
        assert_eq!(b[0], 0x20);
        t.set_pending(69, false);
        assert!(!t.pending(69));
        assert!(t.pending(0));
        t.reset();
        assert!(!t.pending(0));
    }
}
