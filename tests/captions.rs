//! Caption loading: every source format, normalisation, empty/duplicate counting, errors.

use std::path::{Path, PathBuf};

use qwenclip::data::{caption_hash, load_captions, CaptionSet};

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-scratch")
        .join(format!("captions-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn err(r: qwenclip::Result<CaptionSet>) -> String {
    match r {
        Ok(s) => panic!("expected an error, got {:?}", s.captions),
        Err(e) => e.to_string(),
    }
}

#[test]
fn kohya_folder_with_images_and_subfolders() {
    let d = scratch("kohya");
    write(&d.join("img002.png"), [0x89, b'P', b'N', b'G', 0xff, 0xfe]);
    write(&d.join("img002.txt"), "second image\n");
    write(&d.join("img001.png"), [0x89, b'P', b'N', b'G']);
    write(&d.join("img001.txt"), "  a cat\nsitting on a mat  \n\n");
    write(&d.join("sub/b.txt"), "in a subfolder");
    write(&d.join("sub/deeper/a.TXT"), "deeper");
    write(&d.join("sub/dup.txt"), "second image");
    write(&d.join("empty.png"), [0x89, b'P', b'N', b'G']);
    write(&d.join("empty.txt"), "  \n ");
    write(&d.join("notes.md"), "not a caption");
    write(&d.join(".hidden/x.txt"), "hidden");
    let set = load_captions(&d, None).unwrap();
    // Sorted by path: empty.txt, img001.txt, img002.txt, sub/b.txt, sub/deeper/a.TXT, sub/dup.txt
    assert_eq!(
        set.captions,
        vec![
            "a cat sitting on a mat",
            "second image",
            "in a subfolder",
            "deeper"
        ]
    );
    assert_eq!(set.report.read, 6);
    assert_eq!(set.report.empty, 1);
    assert_eq!(set.report.duplicates, 1);
    assert_eq!(set.report.kept, 4);
    assert_eq!(set.report.source, d);
    let line = set.report.to_string();
    assert!(line.contains("4 captions kept of 6 read"), "{line}");
    assert!(
        line.contains("1 empty") && line.contains("1 duplicate dropped"),
        "{line}"
    );
}

#[test]
fn jsonl_caption_text_and_column() {
    let d = scratch("jsonl");
    let f = d.join("caps.jsonl");
    write(
        &f,
        concat!(
            "{\"caption\": \"a red cube\", \"text\": \"ignored\"}\n",
            "{\"text\": \"a blue sphere\"}\n",
            "\n",
            "{\"caption\": \"line one\\nline two\"}\r\n",
            "{\"caption\": \"   \"}\n",
            "{\"caption\": null}\n",
            "\"a bare string\"\n",
            "{\"caption\": \"a red cube\"}\n",
        ),
    );
    let set = load_captions(&f, None).unwrap();
    assert_eq!(
        set.captions,
        vec![
            "a red cube",
            "a blue sphere",
            "line one line two",
            "a bare string"
        ]
    );
    assert_eq!(
        (
            set.report.read,
            set.report.empty,
            set.report.duplicates,
            set.report.kept
        ),
        (7, 2, 1, 4)
    );

    let g = d.join("prompts.jsonl");
    write(
        &g,
        "{\"prompt\": \"p1\", \"caption\": \"c1\"}\n{\"prompt\": \"p2\"}\n",
    );
    let set = load_captions(&g, Some("prompt")).unwrap();
    assert_eq!(set.captions, vec!["p1", "p2"]);
    let e = err(load_captions(&f, Some("prompt")));
    assert!(
        e.contains("caps.jsonl") && e.contains("line 1") && e.contains("`prompt`"),
        "{e}"
    );
}

#[test]
fn jsonl_bad_lines_name_file_and_line() {
    let d = scratch("jsonl-bad");
    let f = d.join("bad.jsonl");
    write(&f, "{\"caption\": \"ok\"}\n\n{\"caption\": \"broken\"\n");
    let e = err(load_captions(&f, None));
    assert!(
        e.contains("bad.jsonl") && e.contains("line 3") && e.contains("invalid JSON"),
        "{e}"
    );

    write(&f, "{\"caption\": \"ok\"}\n{\"title\": \"x\"}\n");
    let e = err(load_captions(&f, None));
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    assert!(
        e.contains("`caption` or `text`") && e.contains("`title`"),
        "{e}"
    );

    write(&f, "{\"caption\": 3}\n");
    let e = err(load_captions(&f, None));
    assert!(e.contains("line 1") && e.contains("a number"), "{e}");

    write(&f, "[1, 2]\n");
    let e = err(load_captions(&f, None));
    assert!(e.contains("line 1") && e.contains("an array"), "{e}");
}

#[test]
fn csv_quoted_commas_quotes_and_newlines() {
    let d = scratch("csv");
    let f = d.join("caps.csv");
    write(
        &f,
        concat!(
            "file,caption,score\r\n",
            "a.png,\"a cat, a dog\",1\r\n",
            "b.png,\"she said \"\"hi\"\"\",2\n",
            "c.png,\"first line\nsecond line\",3\n",
            "\n",
            "d.png,,4\n",
            "e.png,plain caption,5\n",
            "f.png,\"a cat, a dog\",6",
        ),
    );
    let set = load_captions(&f, None).unwrap();
    assert_eq!(
        set.captions,
        vec![
            "a cat, a dog",
            "she said \"hi\"",
            "first line second line",
            "plain caption"
        ]
    );
    assert_eq!(
        (set.report.read, set.report.empty, set.report.duplicates),
        (6, 1, 1)
    );

    // `text` is the fallback, and any column can be named.
    let g = d.join("text.csv");
    write(&g, "text,other\nhello,\"x, y\"\nworld,z\n");
    assert_eq!(
        load_captions(&g, None).unwrap().captions,
        vec!["hello", "world"]
    );
    assert_eq!(
        load_captions(&g, Some("other")).unwrap().captions,
        vec!["x, y", "z"]
    );
}

#[test]
fn csv_errors_name_file_and_line() {
    let d = scratch("csv-bad");
    let f = d.join("caps.csv");
    write(&f, "file,prompt\na.png,hello\n");
    let e = err(load_captions(&f, None));
    assert!(
        e.contains("caps.csv") && e.contains("`caption` or `text`") && e.contains("`prompt`"),
        "{e}"
    );
    let e = err(load_captions(&f, Some("description")));
    assert!(
        e.contains("caps.csv") && e.contains("no column `description`"),
        "{e}"
    );

    // Row 3 has an unquoted comma; the quoted newline in row 2 counts as a line.
    write(&f, "file,caption\na.png,\"two\nlines\"\nb.png,a, b\n");
    let e = err(load_captions(&f, None));
    assert!(
        e.contains("caps.csv") && e.contains("line 4") && e.contains("3 fields"),
        "{e}"
    );

    write(&f, "file,caption\na.png,ok\nb.png,\"never closed\n");
    let e = err(load_captions(&f, None));
    assert!(e.contains("line 3") && e.contains("never closed"), "{e}");

    write(&f, "file,caption\na.png,\"quoted\"junk\n");
    let e = err(load_captions(&f, None));
    assert!(e.contains("line 2") && e.contains("closing quote"), "{e}");
}

#[test]
fn lines_file_with_and_without_extension() {
    let d = scratch("lines");
    let f = d.join("prompts.txt");
    write(
        &f,
        "\u{feff}a red cube\n\n   \nblue sphere  \r\na red cube\ngreen cone",
    );
    let set = load_captions(&f, None).unwrap();
    assert_eq!(
        set.captions,
        vec!["a red cube", "blue sphere", "green cone"]
    );
    assert_eq!(
        (
            set.report.read,
            set.report.empty,
            set.report.duplicates,
            set.report.kept
        ),
        (6, 2, 1, 3)
    );
    let g = d.join("PROMPTS");
    write(&g, "one\ntwo\n");
    assert_eq!(
        load_captions(&g, None).unwrap().captions,
        vec!["one", "two"]
    );
    // A column makes no sense for a plain text file.
    let e = err(load_captions(&g, Some("caption")));
    assert!(e.contains("PROMPTS"), "{e}");
}

#[test]
fn empty_sets_are_errors_with_counts() {
    let d = scratch("empty");
    let f = d.join("blank.txt");
    write(&f, "\n  \n\n");
    let e = err(load_captions(&f, None));
    assert!(
        e.contains("blank.txt") && e.contains("no captions") && e.contains("3 empty"),
        "{e}"
    );
    let g = d.join("empty.jsonl");
    write(&g, "");
    let e = err(load_captions(&g, None));
    assert!(
        e.contains("empty.jsonl") && e.contains("no captions"),
        "{e}"
    );
    let folder = d.join("no-txt");
    write(&folder.join("a.png"), [1, 2, 3]);
    let e = err(load_captions(&folder, None));
    assert!(e.contains("no-txt") && e.contains("no captions"), "{e}");
}

#[test]
fn unreadable_and_missing_files_are_named() {
    let d = scratch("unreadable");
    let f = d.join("latin1.txt");
    write(&f, b"ok line\ncaf\xe9\n");
    let e = err(load_captions(&f, None));
    assert!(
        e.contains("latin1.txt") && e.contains("UTF-8") && e.contains("line 2"),
        "{e}"
    );
    // Inside a folder, the bad file is the one named.
    let folder = d.join("folder");
    write(&folder.join("good.txt"), "fine");
    write(&folder.join("bad.txt"), b"\xff\xfe broken");
    let e = err(load_captions(&folder, None));
    assert!(e.contains("bad.txt") && e.contains("UTF-8"), "{e}");

    let missing = d.join("does-not-exist.jsonl");
    let e = err(load_captions(&missing, None));
    assert!(e.contains("does-not-exist.jsonl"), "{e}");

    let j = d.join("caps.json");
    write(&j, "[\"a\"]");
    let e = err(load_captions(&j, None));
    assert!(e.contains("caps.json") && e.contains(".jsonl"), "{e}");
}

#[cfg(unix)]
#[test]
fn permission_denied_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("perm");
    let f = d.join("secret.txt");
    write(&f, "a caption");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
    let r = load_captions(&f, None);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Root reads anything; only check the message when the read was refused.
    if let Err(e) = r {
        assert!(e.to_string().contains("secret.txt"), "{e}");
    }
}

#[test]
fn hashes_and_fingerprint() {
    let h = caption_hash("a red cube");
    assert_eq!(h.len(), 32);
    assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
    // sha256("abc") = ba7816bf8f01cfea414140de5dae2223...
    assert_eq!(caption_hash("abc"), "ba7816bf8f01cfea414140de5dae2223");

    let a = CaptionSet::from_captions(["one", "two", "three"], "mem").unwrap();
    let b = CaptionSet::from_captions(["one", " two ", "three", "one"], "mem").unwrap();
    assert_eq!(a.captions, b.captions);
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert!(a.fingerprint().starts_with("sha256:"));
    let c = CaptionSet::from_captions(["two", "one", "three"], "mem").unwrap();
    assert_ne!(a.fingerprint(), c.fingerprint(), "order matters");
    let d = CaptionSet::from_captions(["one", "two", "three!"], "mem").unwrap();
    assert_ne!(a.fingerprint(), d.fingerprint());
    assert_eq!(a.hashes()[1], caption_hash("two"));
}
