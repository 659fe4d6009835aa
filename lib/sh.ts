// The shell programs run on a host, each a file of lib/sh/ that shellcheck reads (npm test) and an
// admin can open. One is handed to `sh -c` as its program, with its name as $0 and its arguments
// after: `host.$`sh -c ${program('unpack')} unpack ${root} ${base}``. Not `sh -s`: dash reads a
// piped program in blocks, and would eat the data on stdin behind it. No program is ever built
// from data: what varies arrives as arguments.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type ProgramName =
  | 'bring-and-run'
  | 'cat-regular'
  | 'image-id'
  | 'is-mount-point'
  | 'load'
  | 'present'
  | 'sfs-list'
  | 'sha256'
  | 'store'
  | 'tailscale-ip'
  | 'trigger-mello'
  | 'unpack';

const read = new Map<ProgramName, string>();

/** lib/sh/ beside this file, or, from a bundle (dist/, dist/chunks/), in the package above it. */
function shDir(): string {
  for (let dir = path.dirname(fileURLToPath(import.meta.url)); ; dir = path.dirname(dir)) {
    for (const candidate of [path.join(dir, 'sh'), path.join(dir, 'lib', 'sh')])
      if (fs.existsSync(path.join(candidate, 'unpack.sh'))) return candidate;
    if (dir === path.dirname(dir)) throw new Error('lib/sh/ not found beside the scripts: the package is incomplete');
  }
}

/** The text of lib/sh/NAME.sh. */
export function program(name: ProgramName): string {
  let text = read.get(name);
  if (text === undefined) {
    text = fs.readFileSync(path.join(shDir(), `${name}.sh`), 'utf8');
    read.set(name, text);
  }
  return text;
}
