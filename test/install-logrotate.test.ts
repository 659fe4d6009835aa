// install from a checkout whose node_modules is a symlink (a git worktree sharing another's).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, tempDir } from './helpers.ts';

const BARE = { PATH: '/usr/bin:/bin', HOME: '/root' };
let work: string;

test.before(() => {
  work = tempDir('install');
});

test.after(() => fs.rmSync(work, { recursive: true, force: true }));

test('a checkout whose node_modules is a symlink: install copies it, and deletes nothing from where it points', () => {
  // A fake checkout: the real install and scripts, and node_modules linked to a shared tree that
  // holds a production package, a development one (the lockfile says so) and tsx's loader.
  const checkout = path.join(work, 'worktree');
  const shared = path.join(work, 'shared node_modules');
  for (const [rel, text] of Object.entries({
    'tsx/dist/loader.mjs': 'export {};\n',
    'prodpkg/index.js': 'module.exports = 1;\n',
    'devpkg/index.js': 'module.exports = 2;\n',
  })) {
    fs.mkdirSync(path.dirname(path.join(shared, rel)), { recursive: true });
    fs.writeFileSync(path.join(shared, rel), text);
  }
  fs.mkdirSync(path.join(shared, '.bin'));
  fs.symlinkSync('../devpkg/index.js', path.join(shared, '.bin/devpkg'));
  fs.mkdirSync(path.join(checkout, 'lib'), { recursive: true });
  for (const f of ['install', 'backup-cron.mts', 'backup-verda.mts', 'backup-mello.mts', 'package.json'])
    fs.copyFileSync(path.join(ROOT, f), path.join(checkout, f));
  fs.writeFileSync(path.join(checkout, 'lib/plan.ts'), '// lib\n');
  const lock = {
    lockfileVersion: 3,
    packages: { '': {}, 'node_modules/prodpkg': {}, 'node_modules/tsx': {}, 'node_modules/devpkg': { dev: true } },
  };
  fs.writeFileSync(path.join(checkout, 'package-lock.json'), JSON.stringify(lock));
  fs.symlinkSync(shared, path.join(checkout, 'node_modules'));
  const target = path.join(work, 'from a worktree');
  const r = spawnSync(path.join(checkout, 'install'), ['--prefix', target], {
    cwd: os.tmpdir(),
    env: { ...BARE, PATH: `${path.dirname(process.execPath)}:${BARE.PATH}` },
    encoding: 'utf8',
  });
  assert.is(r.status, 0, r.stdout + r.stderr);
  assert.ok(fs.existsSync(path.join(shared, 'devpkg/index.js')), 'the shared development package is still there');
  assert.ok(fs.lstatSync(path.join(shared, '.bin/devpkg')).isSymbolicLink(), 'and its .bin');
  const installed = path.join(target, 'usr/local/lib/comfymulti-scripts/node_modules');
  assert.ok(fs.lstatSync(installed).isDirectory(), "a real directory, not a link to the checkout's");
  assert.equal(fs.readdirSync(installed).sort(), ['prodpkg', 'tsx']);
});

test.run();
