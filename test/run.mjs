// The test command: the type check, then each test file in its own process (each starts the
// servers it needs). The last line is the plain total CI reads: `N passed, N failed`.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const root = path.resolve(import.meta.dirname, '..');
const only = process.argv.slice(2);
let passed = 0;
let failed = 0;

// The tests need OpenSSH's server, podman, logrotate, age, shellcheck and Ceph RGW (radosgw,
// ceph-mon, ceph-osd) from Debian: on a fresh machine, install them (as root, as .ci/run does), so that
// `npm test` alone is the whole set-up. Ceph without its recommends: ceph-mgr, ceph-mds and 50
// more packages go unused.
const has = (cmd) => spawnSync('sh', ['-c', 'command -v "$1" || [ -x "/usr/sbin/$1" ]', 'sh', cmd]).status === 0;
const lacking = (pairs) => pairs.filter(([cmd]) => !has(cmd)).map(([, pkg]) => pkg);
const missing = lacking([
  ['shellcheck', 'shellcheck'],
  ['sshd', 'openssh-server'],
  ['ssh', 'openssh-client'],
  ['podman', 'podman'],
  ['script', 'bsdutils'],
  ['logrotate', 'logrotate'],
  ['age', 'age'],
]);
const missingCeph = lacking([
  ['radosgw', 'radosgw'],
  ['ceph-mon', 'ceph-mon'],
  ['ceph-osd', 'ceph-osd'],
]);
if (missing.length || missingCeph.length) {
  const all = [...missing, ...missingCeph];
  if (process.getuid?.() !== 0) {
    const how = `run as root to install them, or: apt-get install ${all.join(' ')}`;
    console.log(`missing Debian packages: ${all.join(' ')} (${how})`);
    console.log('0 passed, 1 failed');
    process.exit(1);
  }
  console.log(`installing from Debian: ${all.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
  const install = (args) => spawnSync('apt-get', ['install', '-y', '-qq', ...args], { stdio: 'inherit', env });
  if (missing.length) install(missing);
  if (missingCeph.length) install(['--no-install-recommends', ...missingCeph]);
}

function record(name, ok, detail = '') {
  if (ok) passed++;
  else failed++;
  console.log(`${ok ? 'PASS' : 'FAIL'} ${name}${detail ? ` — ${detail}` : ''}`);
}

// The bundles the scripts run from the checkout, and Verda's that the models steps bring, built
// from the code under test: a bundle older than lib/ is an error at run time, by design.
const build = spawnSync(process.execPath, [path.join(root, 'build.mjs')], { cwd: root, encoding: 'utf8' });
if (build.status !== 0) {
  process.stdout.write(build.stdout + build.stderr);
  record('npm run build', false, `exit ${build.status}`);
}

if (!only.length || only.includes('checks')) {
  const tsc = spawnSync(
    process.execPath,
    [path.join(root, 'node_modules/typescript/bin/tsc'), '--noEmit', '-p', root],
    {
      encoding: 'utf8',
    },
  );
  process.stdout.write(tsc.stdout + tsc.stderr);
  record('tsc --noEmit (strict)', tsc.status === 0);
  // The formatter's check (prettier, print width 120; what it leaves alone is in .prettierignore).
  const prettier = spawnSync(
    process.execPath,
    [path.join(root, 'node_modules/prettier/bin/prettier.cjs'), '--check', '**/*.{ts,mts,mjs,json}'],
    { cwd: root, encoding: 'utf8' },
  );
  process.stdout.write(
    prettier.stdout
      .split('\n')
      .filter((l) => !/^Checking/.test(l))
      .join('\n') + prettier.stderr,
  );
  record('prettier --check (print width 120)', prettier.status === 0);
  // The house as drawn: no import cycle, no import up a floor (.dependency-cruiser.cjs).
  const cruise = spawnSync(
    process.execPath,
    [
      path.join(root, 'node_modules/dependency-cruiser/bin/dependency-cruise.mjs'),
      '--config',
      '.dependency-cruiser.cjs',
      'lib',
    ],
    { cwd: root, encoding: 'utf8' },
  );
  process.stdout.write(cruise.stdout + cruise.stderr);
  record('dependency-cruiser (no cycle, no import up a floor)', cruise.status === 0);
  // Nothing exported that nothing uses, no file that nothing reads (knip.json).
  const knip = spawnSync(process.execPath, [path.join(root, 'node_modules/knip/bin/knip.js')], {
    cwd: root,
    encoding: 'utf8',
  });
  process.stdout.write(knip.stdout + knip.stderr);
  record('knip (no unused file, export or dependency)', knip.status === 0);
  // The shell programs: each a file of lib/sh/, POSIX sh, and the launchers and install beside them.
  const shells = [
    'lib/launch.sh',
    'lib/mello-trigger.sh',
    ...fs.readdirSync(path.join(root, 'lib/sh')).map((f) => `lib/sh/${f}`),
  ];
  const shellcheck = spawnSync('shellcheck', ['--shell=sh', '--severity=warning', ...shells], {
    cwd: root,
    encoding: 'utf8',
  });
  process.stdout.write((shellcheck.stdout ?? '') + (shellcheck.stderr ?? ''));
  record(`shellcheck (${shells.length} shell programs)`, shellcheck.status === 0);
}

const files = fs
  .readdirSync(path.join(root, 'test'))
  .filter((f) => f.endsWith('.test.ts'))
  .filter((f) => !only.length || only.some((o) => f.includes(o)))
  .sort();
for (const file of files) {
  // s3rver makes its listing continuation tokens with DES, which OpenSSL 3 only has in its
  // legacy provider: without it a listing of more than 1,000 keys fails with a 500.
  const r = spawnSync(process.execPath, ['--openssl-legacy-provider', '--import', 'tsx', path.join('test', file)], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0' },
    timeout: 20 * 60 * 1000,
    maxBuffer: 64 * 1024 * 1024,
  });
  const output = (r.stdout ?? '') + (r.stderr ?? '');
  process.stdout.write(output);
  const total = /Total:\s+(\d+)/.exec(output);
  const ok = /Passed:\s+(\d+)/.exec(output);
  if (!total || !ok) {
    record(file, false, `no uvu summary (exit ${r.status}${r.signal ? `, ${r.signal}` : ''})`);
    continue;
  }
  const p = Number(ok[1]);
  const f = Number(total[1]) - p;
  passed += p;
  failed += f;
  if (r.status !== 0 && f === 0) record(file, false, `exit ${r.status}`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
