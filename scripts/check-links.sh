#!/usr/bin/env bash
# Checks every relative link of the repository's Markdown documents: the target must be a file
# or directory inside the repository (not ignored by git, so not a build output or a cache), and
# a heading anchor (`page.md#some-heading`, `#some-heading`) must be a heading of that page, as
# GitHub names them. Web links (http:, https:, mailto:) are not fetched. Exits 1 naming every
# broken link as FILE:LINE: TARGET: why.
#   scripts/check-links.sh [FILE.md...]   (default: every Markdown file git knows of, tracked or
#                                          new; outside git README.md, SECURITY.md, CHANGELOG.md,
#                                          docs/*.md, testdata/PROVENANCE.md)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
in_git=no
git rev-parse --is-inside-work-tree >/dev/null 2>&1 && in_git=yes
if [ $# -gt 0 ]; then
  files=("$@")
elif [ "$in_git" = yes ]; then
  # Every Markdown file of the repository, tracked or new (not ignored ones).
  mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.md' | sort -u)
else
  files=(README.md SECURITY.md CHANGELOG.md docs/*.md testdata/PROVENANCE.md)
fi

# The lines of a Markdown file outside fenced code blocks, as "LINE<TAB>TEXT".
prose() {
  awk '/^[[:space:]]*(```|~~~)/ { fenced = !fenced; next } !fenced { print NR "\t" $0 }' "$1"
}

# GitHub's anchors for a file's headings: lower case, inline-code marks and punctuation
# dropped (letters, digits, spaces, - and _ kept), spaces as hyphens; repeats get -1, -2, ….
anchors() {
  prose "$1" | cut -f2- | { grep -E '^#{1,6} ' || true; } | sed -E 's/^#+ +//; s/ +#+ *$//' |
    tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9 _-]//g; s/ /-/g' |
    awk '{ n = seen[$0]++; print (n ? $0 "-" n : $0) }'
}

# The loops below run in pipelines (subshells): failures are collected in a file.
report=$(mktemp)
trap 'rm -f "$report"' EXIT
fail() { # file, line, target, why
  echo "$1:$2: $3: $4" >>"$report"
}

for file in "${files[@]}"; do
  [ -f "$file" ] || { fail "$file" 0 "$file" "no such document"; continue; }
  dir=$(dirname "$file")
  while IFS=$'\t' read -r line text; do
    # Inline links and images: ](target) or ](target "title").
    { grep -oE '\]\([^)[:space:]]+( "[^"]*")?\)' <<<"$text" || true; } | sed -E 's/^\]\(//; s/( "[^"]*")?\)$//' |
      while read -r target; do
        case "$target" in
          http://* | https://* | mailto:*) continue ;;
        esac
        path=${target%%#*}
        anchor=
        [[ $target == *#* ]] && anchor=${target#*#}
        if [ -z "$path" ]; then
          resolved=$file
        else
          resolved=$(realpath -m --relative-to="$root" "$dir/$path")
          case "$resolved" in
            .. | ../*) fail "$file" "$line" "$target" "points outside the repository"; continue ;;
          esac
          if [ ! -e "$resolved" ]; then
            fail "$file" "$line" "$target" "no such file ($resolved)"
            continue
          fi
          if [ "$in_git" = yes ] && git check-ignore -q "$resolved"; then
            fail "$file" "$line" "$target" "$resolved is ignored by git: not part of the repository"
            continue
          fi
        fi
        if [ -n "$anchor" ] && [[ $resolved == *.md ]] && [ -f "$resolved" ]; then
          known=$(anchors "$resolved" || true)
          grep -qxF -- "$anchor" <<<"$known" ||
            fail "$file" "$line" "$target" "no heading with anchor #$anchor in $resolved"
        fi
      done
  done < <(prose "$file")
done

if [ -s "$report" ]; then
  cat "$report" >&2
  echo "check-links: $(wc -l <"$report") broken link(s)" >&2
  exit 1
fi
echo "check-links: every relative link of ${#files[@]} document(s) resolves"
