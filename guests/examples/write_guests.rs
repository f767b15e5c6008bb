//! Writes every test guest to a folder as `<name>.elf`, for running them by hand:
//! `cargo run -p guests --example write_guests -- DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: write_guests DIR")?;
    std::fs::create_dir_all(&dir)?;
    for name in guests::TEST_GUESTS {
        let elf = guests::test_guest(name)
            .expect("listed guests exist")
            .map_err(|e| format!("{name}: {e}"))?;
        std::fs::write(format!("{dir}/{name}.elf"), elf)?;
    }
    std::fs::write(format!("{dir}/default.elf"), guests::default_guest()?)?;
    Ok(())
}
