fn main() {
    for file in ["sqlite-vec.c", "sqlite-vec.h", "sqlite3.h", "sqlite3ext.h"] {
        println!("cargo:rerun-if-changed={file}");
    }
    cc::Build::new()
        .file("sqlite-vec.c")
        .define("SQLITE_CORE", None)
        // Optimised in every profile: a debug build's vector scan would be ten times slower.
        .opt_level(3)
        // As the registry's crate builds it: its warnings are upstream's, not ours to read.
        .warnings(false)
        // Lets the compiler reorder the sums of the distance functions (one running sum each in
        // the source), so that it can compute them with SIMD; the order of additions changes a
        // distance in its last bits only.
        .flag_if_supported("-fassociative-math")
        .flag_if_supported("-fno-signed-zeros")
        .flag_if_supported("-fno-trapping-math")
        .compile("sqlite_vec0");
}
