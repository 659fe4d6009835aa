// `node --openssl-legacy-provider --import tsx bench/issue-figures.mts`: the figures the
// foundation and backup-verda issues asked for, ours alone. backup-mello over 2,000 small files
// and over 1 GB in 4 files (first run, unchanged rerun: wall time, requests, peak RSS), and
// backup-verda against the fixture over a real sshd (--quick, and an unchanged full rerun with a
// podman image and models: wall time and SSH connections).
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, s3Env, startS3, writeRandomFile, writeTree } from '../test/helpers.ts';
import { startSshd } from '../test/sshd.ts';
import { makeVerda } from '../test/verda-fixture.ts';

const work = fs.mkdtempSync(path.join(os.tmpdir(), 'comfymulti-figures-'));
// A user-files bucket per case, so that one case's listing does not page through another's keys.
const s3 = await startS3(['figures-small', 'figures-big', 'comfy-multi-cache', 'comfy-multi-model-vault-backup']);
const base: NodeJS.ProcessEnv = { ...process.env };
delete base.AWS_CA_BUNDLE;

/** Runs a script under GNU time, asynchronously (the S3 server lives in this process). */
async function timed(script: string, args: string[], env: NodeJS.ProcessEnv) {
  const timeFile = path.join(work, 'time');
  const before = s3.requests.length;
  const started = process.hrtime.bigint();
  const child = spawn('/usr/bin/time', ['-f', '%M', '-o', timeFile, path.join(ROOT, script), ...args], {
    env,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  const code = await new Promise((r) => child.on('close', r));
  if (code !== 0) throw new Error(`${script} exited ${code}: ${err}`);
  return {
    seconds: (Number(process.hrtime.bigint() - started) / 1e9).toFixed(2),
    rssMb: Math.round(Number(fs.readFileSync(timeFile, 'utf8').trim().split('\n').pop()) / 1024),
    requests: s3.requests.length - before,
    puts: s3.requests.slice(before).filter((r) => r.method === 'PUT').length,
    kinds: describeRequests(s3.requests.slice(before)),
  };
}

/** "2 GET list, 1 PUT object": what a run asked the server, to tell listings from bodies. */
function describeRequests(requests: { method: string; url: string }[]): string {
  const counts = new Map<string, number>();
  for (const r of requests) {
    const kind = `${r.method} ${/[?&]list-type=2/.test(r.url) ? 'list' : 'object'}`;
    counts.set(kind, (counts.get(kind) ?? 0) + 1);
  }
  return [...counts].map(([k, n]) => `${n} ${k}`).join(', ') || 'none';
}

const lines: string[] = [];
try {
  for (const [name, bucket, make] of [
    [
      '2,000 small files (4 KiB)',
      'figures-small',
      (d: string) =>
        writeTree(
          d,
          Object.fromEntries(
            Array.from({ length: 2000 }, (_, i) => [`u${i % 20}/f${i}.png`, crypto.randomBytes(4096)]),
          ),
        ),
    ],
    [
      '1 GB in 4 files',
      'figures-big',
      (d: string) =>
        [0, 1, 2, 3].forEach((i) => writeRandomFile(path.join(d, `u${i}`, `video${i}.mp4`), 256 * 1024 * 1024)),
    ],
  ] as const) {
    const data = path.join(work, name.replace(/\W+/g, '-'));
    make(path.join(data, 'outputs'));
    const env = {
      ...base,
      ...s3Env(s3, path.join(data, '.state')),
      MELLO_DATA_DIR: data,
      R2_USER_FILES_BUCKET: bucket,
    };
    const first = await timed('backup-mello.mts', [], env);
    const again = await timed('backup-mello.mts', [], env);
    lines.push(
      `backup-mello, ${name}: first run ${first.seconds} s (${first.requests} requests, peak RSS ${first.rssMb} MB); ` +
        `unchanged rerun ${again.seconds} s (${again.requests} requests: ${again.kinds}; ` +
        `${again.puts} with a body, peak RSS ${again.rssMb} MB)`,
    );
    fs.rmSync(data, { recursive: true, force: true });
  }

  const sshd = await startSshd(['verda']);
  const image = `comfy-multi-worker-figures-${process.pid}`;
  try {
    const rootfs = path.join(work, 'rootfs');
    fs.mkdirSync(path.join(rootfs, 'etc'), { recursive: true });
    fs.writeFileSync(path.join(rootfs, 'etc/motd'), 'figures');
    spawnSync('tar', ['-C', rootfs, '-cf', `${rootfs}.tar`, '.']);
    spawnSync('podman', ['import', '--quiet', `${rootfs}.tar`, image]);
    const verda = makeVerda(path.join(work, 'verda'));
    const env = {
      ...base,
      ...s3Env(s3, path.join(work, 'verda-state')),
      ...verda.env,
      VERDA_HOST: 'verda',
      SSH_CONFIG: sshd.config,
      VERDA_SCRIPTS_DIR: ROOT,
      BACKUP_DIR: path.join(work, 'backups'),
      CONTAINER_CLI: 'podman',
      CONTAINER_IMAGE: image,
    };
    for (const args of [['--quick'], [], []]) {
      const before = sshd.connections();
      const r = await timed('backup-verda.mts', args, env);
      lines.push(
        `backup-verda ${args.join(' ') || '(full)'} against the fixture: ${r.seconds} s, ` +
          `${sshd.connections() - before} SSH connection(s), ${r.puts} R2 bodies sent`,
      );
      await new Promise((res) => setTimeout(res, 1100)); // a new timestamp
    }
  } finally {
    spawnSync('podman', ['rmi', '--force', image]);
    await sshd.stop();
  }
} finally {
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
}
console.log(
  `${new Date().toISOString()} on ${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, Node ${process.version}\n` +
    lines.join('\n'),
);
