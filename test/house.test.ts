// The house's rules hold teeth: .dependency-cruiser.cjs, run by `npm test` over lib/, refuses an
// import cycle and an import up a floor. Shown on a small lib/ of two files in a temp dir (the
// real lib/ passing is npm test's own check).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, tempDir } from './helpers.ts';

/** depcruise with the repository's rules over `files` (path → source) in a lib/ of its own. */
function cruise(files: Record<string, string>) {
  const dir = tempDir('house');
  fs.copyFileSync(path.join(ROOT, '.dependency-cruiser.cjs'), path.join(dir, '.dependency-cruiser.cjs'));
  fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
  for (const [file, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(dir, file)), { recursive: true });
    fs.writeFileSync(path.join(dir, file), text);
  }
  const bin = path.join(ROOT, 'node_modules/dependency-cruiser/bin/dependency-cruise.mjs');
  const r = spawnSync(process.execPath, [bin, '--config', '.dependency-cruiser.cjs', 'lib'], {
    cwd: dir,
    encoding: 'utf8',
    timeout: 60_000,
  });
  fs.rmSync(dir, { recursive: true, force: true });
  return { code: r.status, out: r.stdout + r.stderr };
}

test('an import up a floor fails npm test: cli.ts (floor 1) importing config.ts (floor 2)', () => {
  const r = cruise({
    'lib/cli.ts': "import { x } from './config.ts';\nexport const y = x;\n",
    'lib/config.ts': 'export const x = 1;\n',
  });
  assert.is.not(r.code, 0, r.out);
  assert.match(r.out, /floor-1-not-up-to-2: lib\/cli\.ts → lib\/config\.ts/);
});

test('an import cycle fails npm test, also on one floor: sync.ts ↔ download.ts', () => {
  const r = cruise({
    'lib/sync.ts': "import { b } from './download.ts';\nexport const a = () => b;\n",
    'lib/download.ts': "import { a } from './sync.ts';\nexport const b = () => a;\n",
  });
  assert.is.not(r.code, 0, r.out);
  assert.match(r.out, /no-cycles: lib\/(sync|download)\.ts → \s*lib\/(sync|download)\.ts →/);
});

test('a new file of lib/ must be given a floor; imports down the floors pass', () => {
  const stray = cruise({
    'lib/new-thing.ts': "import { x } from './cli.ts';\nexport const y = x;\n",
    'lib/cli.ts': 'export const x = 1;\n',
  });
  assert.is.not(stray.code, 0, stray.out);
  assert.match(stray.out, /every-lib-file-has-a-floor: lib\/new-thing\.ts → lib\/cli\.ts/);
  const down = cruise({
    'lib/config.ts': "import { x } from './cli.ts';\nexport const y = x;\n",
    'lib/cli.ts': 'export const x = 1;\n',
  });
  assert.is(down.code, 0, down.out);
});

test.run();
