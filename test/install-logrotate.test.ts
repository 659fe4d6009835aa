// install's logrotate rule for the cron log (issue 11), checked by Debian's logrotate itself: it
// parses (`logrotate -d`), and a forced rotation keeps appending to the same file (copytruncate).
// And what install copies (the bundles it builds, the shell programs, nothing else), from a
// checkout whose node_modules is a symlink (a git worktree sharing another's), and the Node.js it
// takes (20.15 or newer).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, tempDir } from './helpers.ts';

const BARE = { PATH: '/usr/bin:/bin', HOME: '/root' };
const MARKER = '# comfymulti-scripts: written by install';
// A prefix as odd as the cron tests': quotes, a space, what a shell would expand.
let prefix: string;
let work: string;
const ruleOf = (root: string) => path.join(root, 'etc/logrotate.d/comfymulti-backup');
const logOf = (root: string) => path.join(root, 'var/log/comfymulti-backup.log');

function install(args: string[]) {
  const r = spawnSync(path.join(ROOT, 'install'), args, {
    cwd: os.tmpdir(),
    env: { ...BARE, PATH: `${path.dirname(process.execPath)}:${BARE.PATH}` },
    encoding: 'utf8',
  });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

function logrotate(args: string[]) {
  const bin = fs.existsSync('/usr/sbin/logrotate') ? '/usr/sbin/logrotate' : 'logrotate';
  const r = spawnSync(bin, args, { encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

test.before(() => {
  work = tempDir('logrotate');
  prefix = path.join(work, `it's a "log" root $(touch PWNED)`);
});

test.after(() => fs.rmSync(work, { recursive: true, force: true }));

test('install writes the rule: weekly, 8 kept, compressed, copytruncate, for the cron log, marked as its own', () => {
  const r = install(['--prefix', prefix]);
  assert.is(r.code, 0, r.out);
  assert.match(r.out, /installed .*etc\/logrotate\.d\/comfymulti-backup \(weekly, 8 kept\)/);
  const rule = ruleOf(prefix);
  assert.is(fs.statSync(rule).mode & 0o777, 0o644, 'logrotate skips a rule others may write');
  const text = fs.readFileSync(rule, 'utf8');
  assert.ok(text.startsWith(MARKER), text);
  const directives = text
    .split('\n')
    .filter((l) => /^\s{4}\S/.test(l))
    .map((l) => l.trim());
  assert.equal(directives, [
    'weekly',
    'rotate 8',
    'compress',
    'delaycompress',
    'missingok',
    'notifempty',
    'copytruncate',
  ]);
});

test('logrotate -d reads the rule without an error and finds the log under the prefix', () => {
  fs.writeFileSync(logOf(prefix), 'a line of the cron log\n');
  const r = logrotate(['-d', '-s', path.join(work, 'state-d'), ruleOf(prefix)]);
  assert.is(r.code, 0, r.out);
  assert.not.match(r.out, /error/i, r.out);
  assert.ok(r.out.includes(`considering log ${logOf(prefix)}`), r.out);
  assert.match(r.out, /weekly \(8 rotations\)/, r.out);
  // Forced, still in debug mode (nothing done): what a rotation would do.
  const forced = logrotate(['-d', '-f', '-s', path.join(work, 'state-d'), ruleOf(prefix)]);
  assert.is(forced.code, 0, forced.out);
  assert.ok(
    forced.out.includes(`copying ${logOf(prefix)} to ${logOf(prefix)}.1\ntruncating ${logOf(prefix)}`),
    forced.out,
  );
  assert.is(fs.readFileSync(logOf(prefix), 'utf8'), 'a line of the cron log\n', 'debug mode changed nothing');
});

test('a forced rotation empties the log in place (a run appending goes on), compresses a week later', () => {
  const log = logOf(prefix);
  const state = path.join(work, 'state');
  const fd = fs.openSync(log, 'a'); // as cron's `>>`, held open across the rotation
  try {
    fs.writeSync(fd, 'before the rotation\n');
    const inode = fs.statSync(log).ino;
    const first = logrotate(['-f', '-s', state, ruleOf(prefix)]);
    assert.is(first.code, 0, first.out);
    assert.is(fs.statSync(log).ino, inode, 'the same file, emptied');
    assert.match(fs.readFileSync(`${log}.1`, 'utf8'), /before the rotation/);
    fs.writeSync(fd, 'after the rotation\n');
    assert.is(
      fs.readFileSync(log, 'utf8'),
      'after the rotation\n',
      'appended at the start of the emptied file, nothing lost',
    );
    const second = logrotate(['-f', '-s', state, ruleOf(prefix)]);
    assert.is(second.code, 0, second.out);
    assert.ok(fs.existsSync(`${log}.2.gz`), 'compressed from the second rotation on (delaycompress)');
    assert.match(fs.readFileSync(`${log}.1`, 'utf8'), /after the rotation/);
  } finally {
    fs.closeSync(fd);
  }
});

test("a second install leaves one rule, the same; --uninstall removes it, and only if it is install's", () => {
  const before = fs.readFileSync(ruleOf(prefix), 'utf8');
  const r = install(['--prefix', prefix]);
  assert.is(r.code, 0, r.out);
  assert.equal(fs.readdirSync(path.dirname(ruleOf(prefix))), ['comfymulti-backup'], 'one file, no temporary left');
  assert.is(fs.readFileSync(ruleOf(prefix), 'utf8'), before);
  fs.writeFileSync(path.join(path.dirname(ruleOf(prefix)), 'other'), '/var/log/other.log { weekly }\n');
  const u = install(['--prefix', prefix, '--uninstall']);
  assert.is(u.code, 0, u.out);
  assert.not.ok(fs.existsSync(ruleOf(prefix)));
  assert.ok(fs.existsSync(path.join(path.dirname(ruleOf(prefix)), 'other')), 'another rule is left');
  assert.ok(fs.existsSync(logOf(prefix)), 'the log is left');
  // A rule of the same name that install did not write is left, and said so.
  fs.writeFileSync(ruleOf(prefix), '/var/log/mine.log { daily }\n');
  const again = install(['--prefix', prefix, '--uninstall']);
  assert.is(again.code, 0, again.out);
  assert.match(again.out, /left .*comfymulti-backup: not written by install/);
  assert.ok(fs.existsSync(ruleOf(prefix)));
});

test('a prefix logrotate would read as a pattern is exit 2, and nothing is installed', () => {
  for (const odd of ['with {brace}', 'star*', 'back\\slash']) {
    const target = path.join(work, odd);
    const r = install(['--prefix', target]);
    assert.is(r.code, 2, `${odd}: ${r.out}`);
    assert.match(r.out, /--prefix must not contain/);
    assert.equal(fs.readdirSync(target), [], `${odd}: nothing installed`);
  }
});

test('install builds and copies what runs: the bundles and lib/sh/, not node_modules, not an untracked *.mts; from a worktree sharing node_modules', () => {
  // A checkout of the tracked files, an untracked script beside them, node_modules a link to ours.
  const checkout = path.join(work, 'worktree');
  const tracked = spawnSync('git', ['ls-files', '-z'], { cwd: ROOT, encoding: 'utf8' })
    .stdout.split('\0')
    .filter(Boolean);
  for (const rel of tracked) {
    fs.mkdirSync(path.dirname(path.join(checkout, rel)), { recursive: true });
    fs.copyFileSync(path.join(ROOT, rel), path.join(checkout, rel));
    fs.chmodSync(path.join(checkout, rel), fs.statSync(path.join(ROOT, rel)).mode);
  }
  fs.writeFileSync(path.join(checkout, 'scratch.mts'), "// an admin's experiment, not part of the package\n");
  fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(checkout, 'node_modules'));
  const shared = fs.readdirSync(path.join(ROOT, 'node_modules')).sort();
  const target = path.join(work, 'from a worktree');
  const r = spawnSync(path.join(checkout, 'install'), ['--prefix', target], {
    cwd: os.tmpdir(),
    env: { ...BARE, PATH: `${path.dirname(process.execPath)}:${BARE.PATH}` },
    encoding: 'utf8',
  });
  assert.is(r.status, 0, r.stdout + r.stderr);
  const pkg = path.join(target, 'usr/local/lib/comfymulti-scripts');
  assert.equal(fs.readdirSync(pkg).sort(), [
    'backup-cron.mts',
    'backup-mello.mts',
    'backup-verda.mts',
    'dist',
    'lib',
    'package.json',
    'restore-verda.mts',
  ]);
  assert.equal(fs.readdirSync(path.join(pkg, 'lib')), ['sh']);
  assert.ok(fs.existsSync(path.join(pkg, 'dist/verda.mjs')));
  assert.not.ok(
    fs.existsSync(path.join(pkg, 'dist/scratch.mjs')) || fs.existsSync(path.join(target, 'usr/local/bin/scratch.mts')),
  );
  assert.equal(
    fs.readdirSync(path.join(ROOT, 'node_modules')).sort(),
    shared,
    'nothing deleted where node_modules points',
  );
  // The installed launcher runs from / under cron's bare environment.
  const help = spawnSync(path.join(target, 'usr/local/bin/backup-cron.mts'), ['--help'], {
    cwd: '/',
    env: BARE,
    encoding: 'utf8',
  });
  assert.is(help.status, 0, help.stdout + help.stderr);
  assert.match(help.stdout, /^Usage: backup-cron\.mts/);
});

test('install needs Node.js 20.15 (zlib.crc32): a 20.14 is refused, exit 2, nothing installed', () => {
  const old = path.join(work, 'node-20.14');
  fs.mkdirSync(old);
  fs.writeFileSync(path.join(old, 'node'), '#!/bin/sh\necho v20.14.0\n', { mode: 0o755 });
  const target = path.join(work, 'old node');
  const r = install(['--prefix', target, '--node', path.join(old, 'node')]);
  assert.is(r.code, 2, r.out);
  assert.match(r.out, /Node\.js v20\.14\.0 at \S+ is too old: the scripts need 20\.15 or newer/);
  assert.not.ok(fs.existsSync(target));
});

test("the prefix's `$(touch PWNED)` was never run by a shell, in any test above", () => {
  for (const d of [work, os.tmpdir(), process.cwd()])
    assert.not.ok(fs.existsSync(path.join(d, 'PWNED')), `no PWNED in ${d}`);
});

test.run();
