#!/usr/bin/env bash
# Installs what an operator runs wdvirt with: the binary, the systemd unit,
# shell completions (bash, zsh, fish), man pages, and the example
# configuration in /etc/wdvirt (only where none exists yet). Idempotent.
#
#   bash scripts/install.sh                 build (release) and install under /usr/local
#   DESTDIR=/tmp/pkg bash scripts/install.sh   stage into a directory instead
#   WDVIRT_BIN=path/to/wdvirt ...           install this binary instead of building
#
# Where libvirt is installed ($DESTDIR/etc/libvirt exists), also the libvirt
# hook /etc/libvirt/hooks/qemu.d/wdvirt (docs/libvirt.md).
#
# Then: systemctl daemon-reload && systemctl enable --now wdvirt
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
if [ -z "${WDVIRT_BIN:-}" ]; then
  cargo build --release --locked --bin wdvirt
  WDVIRT_BIN=target/release/wdvirt
fi
[ -x "$WDVIRT_BIN" ] || { echo "install: $WDVIRT_BIN is not an executable" >&2; exit 2; }

bin="$DESTDIR$PREFIX/bin"
unit="$DESTDIR/etc/systemd/system"
man1="$DESTDIR$PREFIX/share/man/man1"
bashc="$DESTDIR$PREFIX/share/bash-completion/completions"
zshc="$DESTDIR$PREFIX/share/zsh/site-functions"
fishc="$DESTDIR$PREFIX/share/fish/vendor_completions.d"
etc="$DESTDIR/etc/wdvirt"
mkdir -p "$bin" "$unit" "$man1" "$bashc" "$zshc" "$fishc" "$etc"

install -m 0755 "$WDVIRT_BIN" "$bin/wdvirt"
sed "s#/usr/local/bin/wdvirt#$PREFIX/bin/wdvirt#" dist/systemd/wdvirt.service >"$unit/wdvirt.service"
"$bin/wdvirt" man "$man1" 2>/dev/null
"$bin/wdvirt" completions bash >"$bashc/wdvirt"
"$bin/wdvirt" completions zsh >"$zshc/_wdvirt"
"$bin/wdvirt" completions fish >"$fishc/wdvirt.fish"
# An operator's own configuration is never overwritten.
if ! ls "$etc"/*.yaml >/dev/null 2>&1; then
  install -m 0644 policies/default.yaml "$etc/default.yaml"
fi
"$bin/wdvirt" validate "$etc" >/dev/null
# libvirt looks for hooks when libvirtd starts: restart it if it had none.
if [ -d "$DESTDIR/etc/libvirt" ]; then
  "$bin/wdvirt" libvirt install-hook --hooks-dir "$DESTDIR/etc/libvirt/hooks" --wdvirt "$PREFIX/bin/wdvirt" >/dev/null
fi
echo "install: wdvirt installed under ${DESTDIR:-/}${PREFIX#/} (unit: $unit/wdvirt.service, config: $etc)"
