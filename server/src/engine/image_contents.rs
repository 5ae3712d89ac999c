//! What an image provides: which programs of note its root filesystem has, read from the ext4 file itself with
//! `debugfs` (no mount, no guest). Agents and the CLI's next steps use it to suggest only what a VM of the
//! image can run. Cached per root filesystem file, keyed by its size and modification time.
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncReadExt;

use tools_schema::image::NOTABLE_PROGRAMS;

const PROGRAM_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/usr/local/sbin"];
/// The most of debugfs's listing read: a /usr/bin of a few thousand entries is a few hundred KiB.
const LISTING_MAX: u64 = 8 << 20;

/// The programs of `NOTABLE_PROGRAMS` the ext4 image at `rootfs` has in `PROGRAM_DIRS` (files or symlinks),
/// in list order. Empty when the image cannot be read.
pub(crate) async fn read_provides(debugfs: &Path, rootfs: &Path) -> Vec<String> {
    let commands: String = PROGRAM_DIRS.iter().map(|d| format!("ls -p {d}\n")).collect();
    let child = tokio::process::Command::new(debugfs)
        .arg("-f")
        .arg("-")
        .arg(rootfs)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return vec![] };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(commands.as_bytes()).await;
    }
    let mut listing = Vec::new();
    let Some(stdout) = child.stdout.take() else { return vec![] };
    let read = tokio::time::timeout(Duration::from_secs(10), stdout.take(LISTING_MAX).read_to_end(&mut listing)).await;
    let _ = child.kill().await;
    if read.is_err() {
        tracing::warn!(rootfs = %rootfs.display(), "debugfs did not list the image in time");
        return vec![];
    }
    programs_in_listing(&String::from_utf8_lossy(&listing))
}

/// Reads `ls -p` lines (`/inode/mode/uid/gid/name/size/`) and keeps the notable regular files and symlinks.
fn programs_in_listing(listing: &str) -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split('/').collect();
        let [_, _inode, mode, _uid, _gid, name, ..] = fields.as_slice() else { continue };
        // 10xxxx regular file, 12xxxx symlink (octal file type bits).
        if (mode.starts_with("10") || mode.starts_with("12")) && NOTABLE_PROGRAMS.contains(name) {
            found.insert(*name);
        }
    }
    NOTABLE_PROGRAMS.iter().filter(|p| found.contains(*p)).map(|p| p.to_string()).collect()
}

/// A root filesystem file as it was when read: size and modification time (ns).
type FileVersion = (u64, i128);

/// Images' contents, read once per root filesystem file.
#[derive(Default)]
pub(crate) struct ImageContents {
    /// By root filesystem path: the version read, and what it provides.
    read: Mutex<HashMap<String, (FileVersion, Vec<String>)>>,
}

impl ImageContents {
    pub(crate) async fn provides(&self, debugfs: Option<&Path>, rootfs: &str) -> Vec<String> {
        let Ok(meta) = std::fs::metadata(rootfs) else { return vec![] };
        let stamp = (
            meta.len(),
            meta.modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128),
        );
        if let Some((seen, provides)) = self.read.lock().get(rootfs) {
            if *seen == stamp {
                return provides.clone();
            }
        }
        let Some(debugfs) = debugfs else { return vec![] };
        let provides = read_provides(debugfs, Path::new(rootfs)).await;
        self.read.lock().insert(rootfs.to_string(), (stamp, provides.clone()));
        provides
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_notable_files_and_symlinks_count_and_come_in_list_order() {
        let listing = "debugfs 1.47.0 (5-Feb-2023)\n/575/040755/0/0/.//\n/576/100755/0/0/python3/68496/\n\
                       /577/120777/0/0/node/12/\n/578/100755/0/0/git/1/\n/579/040755/0/0/claude//\n\
                       /580/100755/0/0/evil\nname/1/\n/581/100644/0/0/bash/1/\n";
        assert_eq!(programs_in_listing(listing), ["bash", "git", "python3", "node"]);
    }

    #[tokio::test]
    async fn a_real_ext4_image_is_read_without_mounting_it() {
        let (Some(mkfs), Some(debugfs)) = (which("mkfs.ext4"), which("debugfs")) else {
            panic!("e2fsprogs (mkfs.ext4, debugfs) is part of every Debian host; scripts/setup-host.sh checks it");
        };
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        std::fs::create_dir_all(tree.join("usr/local/bin")).unwrap();
        std::fs::write(tree.join("usr/bin/git"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("../lib/node_modules/x", tree.join("usr/local/bin/claude")).unwrap();
        let image = dir.path().join("root.ext4");
        let st = std::process::Command::new(mkfs)
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("8M")
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(read_provides(&debugfs, &image).await, ["git", "claude"]);
        let contents = ImageContents::default();
        assert_eq!(contents.provides(Some(&debugfs), image.to_str().unwrap()).await, ["git", "claude"]);
        assert_eq!(contents.provides(None, image.to_str().unwrap()).await, ["git", "claude"], "cached");
        assert!(read_provides(&debugfs, &dir.path().join("missing.ext4")).await.is_empty());
    }

    fn which(name: &str) -> Option<std::path::PathBuf> {
        ["/usr/sbin", "/sbin", "/usr/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
    }
}
