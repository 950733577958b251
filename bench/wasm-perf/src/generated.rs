//! A deterministic, valid proxy-wasm module of at least 2 MiB: thousands of
//! distinct arithmetic-and-memory functions behind the minimal set of
//! proxy-wasm exports, so its compile and load times resemble a large real filter.

/// Smallest size the generated module must reach.
pub const MIN_BYTES: usize = 2 * 1024 * 1024;
/// Generated functions; each has its own constants and operation mix.
pub const FUNCTIONS: u32 = 2200;
/// Straight-line steps per function, besides the loop.
const STEPS: u32 = 64;
/// Initial linear memory, in 64 KiB pages (what a Rust SDK filter starts with).
pub const MEMORY_PAGES: u32 = 17;

/// A small deterministic generator so the module is byte-identical on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

/// The module's WAT text.
pub fn wat_text() -> String {
    let mut rng = Lcg(0x6c61_6365_7769_6e67);
    let mut out = String::with_capacity(16 * 1024 * 1024);
    out.push_str("(module\n");
    out.push_str(&format!("  (memory (export \"memory\") {MEMORY_PAGES})\n"));
    out.push_str(
        r#"  (global $bump (mut i32) (i32.const 65536))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    global.get $bump
    local.set $p
    global.get $bump
    local.get $n
    i32.add
    i32.const 7
    i32.add
    i32.const -8
    i32.and
    global.set $bump
    local.get $p)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
"#,
    );
    // on_configure runs a few generated functions (a shallow call tree), then accepts.
    let last = FUNCTIONS - 1;
    out.push_str(&format!(
        "  (func (export \"proxy_on_configure\") (param $root i32) (param $size i32) (result i32)\n    local.get $size\n    i32.const 3\n    call $f{last}\n    drop\n    i32.const 1)\n"
    ));
    for i in 0..FUNCTIONS {
        push_function(&mut out, i, &mut rng);
    }
    out.push_str(")\n");
    out
}

/// `$f{i}(x, depth) -> i32`: a loop that mixes `x` into memory, a run of
/// varied arithmetic steps, and (while `depth > 0`) a call to an earlier function.
fn push_function(out: &mut String, i: u32, rng: &mut Lcg) {
    let iterations = 2 + rng.next() % 6;
    let slot = (rng.next() % 4096) * 4;
    out.push_str(&format!(
        "  (func $f{i} (param $x i32) (param $depth i32) (result i32)\n    (local $acc i32) (local $k i32) (local $t i64)\n    local.get $x\n    i32.const {c}\n    i32.xor\n    local.set $acc\n    (block $done\n      (loop $next\n        i32.const {slot}\n        i32.const {slot}\n        i32.load\n        local.get $acc\n        i32.add\n        i32.store\n        local.get $acc\n        i32.const {m}\n        i32.mul\n        local.get $k\n        i32.add\n        local.set $acc\n        local.get $k\n        i32.const 1\n        i32.add\n        local.tee $k\n        i32.const {iterations}\n        i32.lt_u\n        br_if $next))\n",
        c = rng.next() as i32,
        m = (rng.next() | 1) as i32,
    ));
    for _ in 0..STEPS {
        let constant = rng.next() as i32;
        let op = match rng.next() % 9 {
            0 => "i32.add",
            1 => "i32.sub",
            2 => "i32.mul",
            3 => "i32.xor",
            4 => "i32.or",
            5 => "i32.and",
            6 => "i32.rotl",
            7 => "i32.shr_u",
            _ => "i32.shl",
        };
        out.push_str(&format!(
            "    local.get $acc\n    i32.const {constant}\n    {op}\n    local.set $acc\n"
        ));
        if rng.next().is_multiple_of(8) {
            // A 64-bit step, so both integer widths are compiled.
            let wide = i64::from(rng.next()) << 17 | i64::from(rng.next());
            out.push_str(&format!(
                "    local.get $acc\n    i64.extend_i32_u\n    i64.const {wide}\n    i64.mul\n    local.tee $t\n    i64.const 29\n    i64.shr_u\n    local.get $t\n    i64.xor\n    i32.wrap_i64\n    local.set $acc\n"
            ));
        }
    }
    if i > 0 {
        let callee = rng.next() % i;
        out.push_str(&format!(
            "    local.get $depth\n    (if\n      (then\n        local.get $acc\n        local.get $depth\n        i32.const 1\n        i32.sub\n        call $f{callee}\n        local.get $acc\n        i32.add\n        local.set $acc))\n"
        ));
    }
    out.push_str("    local.get $acc)\n");
}

/// The compiled module bytes; fails if the text does not assemble or comes out
/// smaller than [`MIN_BYTES`].
pub fn module_bytes() -> anyhow::Result<Vec<u8>> {
    let bytes = wat::parse_str(wat_text())?;
    anyhow::ensure!(
        bytes.len() >= MIN_BYTES,
        "generated module is {} bytes, below the {MIN_BYTES} it must reach",
        bytes.len()
    );
    Ok(bytes)
}

/// Initial pages of the module's first defined memory, read from its memory
/// section (id 5); `None` if the module defines none or the section is malformed.
pub fn initial_memory_pages(module: &[u8]) -> Option<u64> {
    let mut pos = 8; // magic + version
    while pos < module.len() {
        let id = *module.get(pos)?;
        pos += 1;
        let size = usize::try_from(read_leb(module, &mut pos)?).ok()?;
        let body_start = pos;
        if id == 5 {
            let mut p = body_start;
            let count = read_leb(module, &mut p)?;
            if count == 0 {
                return None;
            }
            let flags = *module.get(p)?;
            p += 1;
            let _ = flags;
            return read_leb(module, &mut p);
        }
        pos = body_start.checked_add(size)?;
    }
    None
}

/// Reads an unsigned LEB128 number at `pos`, advancing it.
fn read_leb(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0u32;
    loop {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_module_is_large_valid_and_deterministic() {
        let a = module_bytes().unwrap();
        let b = module_bytes().unwrap();
        assert_eq!(a, b);
        assert!(a.len() >= MIN_BYTES);
        assert_eq!(initial_memory_pages(&a), Some(u64::from(MEMORY_PAGES)));
    }
}
