//! NPY and NPZ reading (and NPY/NPZ writing, for tests and the CLI), by hand:
//! an `.npz` is a zip of `.npy` files, and `numpy.savez` stores them
//! uncompressed, so a small reader of the zip directory and the NPY header is
//! all that is needed. Compressed archives (`savez_compressed`) are refused
//! with a clear error.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::Tensor;
use crate::error::{Error, Result};

fn bad(msg: impl Into<String>) -> Error {
    Error::Data(msg.into())
}

fn u16_at(b: &[u8], o: usize) -> Result<u16> {
    b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or_else(|| bad("npz: truncated"))
}

fn u32_at(b: &[u8], o: usize) -> Result<u32> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad("npz: truncated"))
}

/// Parses one `.npy` file: f32, f64 (→ f32), i64, i32, u8, bool (→ i64).
pub fn parse_npy(b: &[u8]) -> Result<Tensor> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("not an NPY file"));
    }
    let (hlen, start) = match b[6] {
        1 => (usize::from(u16_at(b, 8)?), 10),
        2 | 3 => (u32_at(b, 8)? as usize, 12),
        v => return Err(bad(format!("NPY version {v}"))),
    };
    let header = b.get(start..start + hlen).ok_or_else(|| bad("NPY header truncated"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("NPY header is not text"))?;
    let field = |key: &str| -> Result<&str> {
        let i = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| bad(format!("NPY header lacks {key}")))?;
        let rest = &header[i + key.len() + 2..];
        Ok(rest.trim_start_matches([':', ' ']))
    };
    let descr = field("descr")?;
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap_or("");
    if field("fortran_order")?.starts_with("True") {
        return Err(bad("Fortran-ordered NPY arrays are not supported"));
    }
    let shape_s = field("shape")?;
    let inner = shape_s.trim_start_matches('(').split(')').next().unwrap_or("");
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(format!("bad NPY shape `{shape_s}`"))))
        .collect::<Result<_>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("NPY shape overflows"))?;
    let data = &b[start + hlen..];
    let need = |size: usize| -> Result<&[u8]> {
        count.checked_mul(size).and_then(|n| data.get(..n)).ok_or_else(|| bad("NPY data truncated"))
    };
    let shape = IxDyn(&shape);
    let f = |v: Vec<f32>| {
        Ok(Tensor::F32(ArrayD::from_shape_vec(shape.clone(), v).map_err(|e| bad(e.to_string()))?))
    };
    let i = |v: Vec<i64>| {
        Ok(Tensor::I64(ArrayD::from_shape_vec(shape.clone(), v).map_err(|e| bad(e.to_string()))?))
    };
    match descr {
        "<f4" => f(need(4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        "<f8" => f(need(8)?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect()),
        "<i8" => i(need(8)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()),
        "<i4" => i(need(4)?
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect()),
        "|u1" | "|b1" => i(need(1)?.iter().map(|&v| i64::from(v)).collect()),
        other => Err(bad(format!(
            "NPY dtype `{other}` is not supported (use float32, float64, int64, int32, uint8 or bool)"
        ))),
    }
}

/// Reads every array of an `.npz` file, by name (without the `.npy` suffix).
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let b = std::fs::read(path)
        .map_err(|source| Error::Io { context: format!("reading {}", path.display()), source })?;
    parse_npz(&b).map_err(|e| match e {
        Error::Data(m) => Error::Data(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// Parses an in-memory `.npz`.
pub fn parse_npz(b: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    // End of central directory: the last `PK\x05\x06` within the final 64 KiB + 22 bytes.
    let lo = b.len().saturating_sub(65_557);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..].starts_with(b"PK\x05\x06"))
        .ok_or_else(|| bad("not a zip/npz file"))?;
    let entries = usize::from(u16_at(b, eocd + 10)?);
    let mut at = u32_at(b, eocd + 16)? as usize;
    let mut out = BTreeMap::new();
    // Stored entries cannot hold more bytes than the file: entries that
    // share (or overlap) their data are refused, not decoded again and again.
    let mut stored = 0usize;
    for _ in 0..entries {
        if !b.get(at..).is_some_and(|s| s.starts_with(b"PK\x01\x02")) {
            return Err(bad("bad zip central directory"));
        }
        let method = u16_at(b, at + 10)?;
        let mut csize = u32_at(b, at + 20)? as u64;
        let name_len = usize::from(u16_at(b, at + 28)?);
        let extra_len = usize::from(u16_at(b, at + 30)?);
        let comment_len = usize::from(u16_at(b, at + 32)?);
        let mut local = u32_at(b, at + 42)? as u64;
        let name = b.get(at + 46..at + 46 + name_len).ok_or_else(|| bad("zip name truncated"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        // ZIP64 extra field (numpy writes it for large arrays).
        let extra = b.get(at + 46 + name_len..at + 46 + name_len + extra_len).unwrap_or_default();
        let mut e = 0;
        while e + 4 <= extra.len() {
            let (id, len) = (
                u16::from_le_bytes([extra[e], extra[e + 1]]),
                usize::from(u16::from_le_bytes([extra[e + 2], extra[e + 3]])),
            );
            if id == 1 {
                let vals: Vec<u64> = extra[e + 4..(e + 4 + len).min(extra.len())]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect();
                let mut it = vals.into_iter();
                if u32_at(b, at + 24)? == u32::MAX {
                    it.next();
                }
                if csize == u64::from(u32::MAX) {
                    csize = it.next().unwrap_or(csize);
                }
                if local == u64::from(u32::MAX) {
                    local = it.next().unwrap_or(local);
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            return Err(bad(format!(
                "`{name}` is compressed (method {method}); write the npz with numpy.savez, not savez_compressed"
            )));
        }
        let local = local as usize;
        if !b.get(local..).is_some_and(|s| s.starts_with(b"PK\x03\x04")) {
            return Err(bad("bad zip local header"));
        }
        let data_at =
            local + 30 + usize::from(u16_at(b, local + 26)?) + usize::from(u16_at(b, local + 28)?);
        let data = b
            .get(data_at..data_at + csize as usize)
            .ok_or_else(|| bad(format!("`{name}` truncated")))?;
        stored = stored.saturating_add(data.len());
        if stored > b.len() {
            return Err(bad("zip entries overlap (their data adds up to more than the file)"));
        }
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        if out.contains_key(&key) {
            return Err(bad(format!("`{key}` is stored twice")));
        }
        out.insert(key, parse_npy(data)?);
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// Serialises a tensor as `.npy` (f32 → `<f4`, f16 → `<f2`, i64 → `<i8`).
pub fn write_npy(t: &Tensor) -> Vec<u8> {
    let (descr, shape) = match t {
        Tensor::F32(a) => ("<f4", a.shape()),
        Tensor::F16(a) => ("<f2", a.shape()),
        Tensor::I64(a) => ("<i8", a.shape()),
    };
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_s =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match t {
        Tensor::F32(a) => {
            a.as_standard_layout().iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
        }
        Tensor::F16(a) => {
            a.as_standard_layout().iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
        }
        Tensor::I64(a) => {
            a.as_standard_layout().iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
        }
    }
    out
}

/// An uncompressed `.npz` (as `numpy.savez` writes it) of named tensors.
pub fn write_npz(arrays: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let crc = |d: &[u8]| crc32fast::hash(d);
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, t) in arrays {
        let data = write_npy(t);
        let fname = format!("{name}.npy");
        let local = out.len() as u32;
        let head = |sig: &[u8], central: bool| {
            let mut h = sig.to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&[0, 0, 0, 0]); // flags, method (stored)
            h.extend_from_slice(&[0, 0, 0x21, 0]); // time, date (1980-01-01)
            h.extend_from_slice(&crc(&data).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(fname.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h
        };
        out.extend(head(b"PK\x03\x04", false));
        out.extend_from_slice(fname.as_bytes());
        out.extend_from_slice(&data);
        central.extend(head(b"PK\x01\x02", true));
        central.extend_from_slice(&[0; 6]); // comment len, disk, internal attrs
        central.extend_from_slice(&[0; 4]); // external attrs
        central.extend_from_slice(&local.to_le_bytes());
        central.extend_from_slice(fname.as_bytes());
    }
    let cd_at = out.len() as u32;
    let n = arrays.len() as u16;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_at.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}
