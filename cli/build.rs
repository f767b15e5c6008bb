//! Assembles the default guest (guests crate) into OUT_DIR for `include_bytes!`.

fn main() {
    let out_dir = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let guest = guests::default_guest().expect("the default guest assembles");
    std::fs::write(
        std::path::Path::new(&out_dir).join("default-guest.elf"),
        guest,
    )
    .expect("write the default guest to OUT_DIR");
}
