// What an admin sees during the long steps over a WAN: backup-verda (full) sends models from a
// "Verda" (a loopback sshd) to R2 through the WAN proxy, then restore-verda brings them back into
// a fresh root; each run once on a terminal (a pty from script(1): the redrawn progress line) and
// once into a file as cron has it (dated stats lines every STATS_INTERVAL). Prints what each
// printed. Usage: node --import tsx bench/progress.mts [--profile far|eu|...] [--mib N]
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import minimist from 'minimist';
import { startS3, s3Env, tempDir, writeRandomFile, ROOT } from '../test/helpers.ts';
import { startSshd } from '../test/sshd.ts';
import { makeVerda } from '../test/verda-fixture.ts';
import { PROFILES, WanProxy, describeProfile } from './wan-proxy.mts';

const args = minimist(process.argv.slice(2), { string: ['profile'], default: { profile: 'far', mib: 96 } });
const profile = PROFILES[args.profile];
if (!profile) throw new Error(`--profile: one of ${Object.keys(PROFILES).join(', ')}`);
const MODELS = 'progress-models';
const CACHE = 'progress-cache';
const IMAGE = 'localhost/comfymulti-progress:latest';

// Verda's side is the bundle built from lib/ (a stale one fails the models steps, rightly).
if (spawnSync(process.execPath, ['build.mjs'], { cwd: ROOT, stdio: 'ignore' }).status !== 0)
  throw new Error('build.mjs failed');
const s3 = await startS3([MODELS, CACHE]);
const proxy = await WanProxy.start(s3.endpoint, profile);
const sshd = await startSshd(['verda']);
const work = tempDir('progress');
try {
  const verda = makeVerda(path.join(work, 'verda'));
  // A small worker image: the full run saves it; the models are what this shows.
  const rootfs = path.join(work, 'rootfs');
  fs.mkdirSync(path.join(rootfs, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(rootfs, 'etc/motd'), 'progress');
  spawnSync('tar', ['-C', rootfs, '-cf', `${rootfs}.tar`, '.']);
  spawnSync('podman', ['import', '--quiet', `${rootfs}.tar`, IMAGE]);
  for (let i = 0; i < 3; i++)
    writeRandomFile(path.join(verda.models, `checkpoints/model-${i}.safetensors`), (args.mib * 1024 * 1024) / 3);
  const env = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    HOME: process.env.HOME ?? '/root',
    ...s3Env(s3, path.join(work, 'state')),
    R2_ENDPOINT: proxy.endpoint,
    R2_MODELS_BUCKET: MODELS,
    R2_CACHE_BUCKET: CACHE,
    ...verda.env,
    VERDA_HOST: 'verda',
    SSH_CONFIG: sshd.config,
    BACKUP_DIR: path.join(work, 'mello/backups/verda'),
    CONTAINER_CLI: 'podman',
    CONTAINER_IMAGE: IMAGE,
    STATS_INTERVAL: '2',
  };
  const show = (title: string, text: string) => console.log(`\n----- ${title}\n${text.trimEnd()}`);
  // On a terminal: script(1) gives the run a pty; its typescript keeps every redraw (\r).
  const onTerminal = async (label: string, argv: string[], extra: Record<string, string> = {}) => {
    const typescript = path.join(work, `${label}.typescript`);
    const cmd = argv.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
    // script(1) ends its session at the end of its input: it is given an input kept open.
    const child = spawn('script', ['-qfec', cmd, typescript], {
      env: { ...env, ...extra, TERM: 'xterm' },
      stdio: ['pipe', 'ignore', 'ignore'],
    });
    const ended = await Promise.race([
      new Promise((resolve) => child.on('exit', () => resolve(true))),
      new Promise((resolve) => setTimeout(() => resolve(false), 180_000)),
    ]);
    if (!ended) {
      console.log(
        spawnSync('sh', ['-c', `ps -eo pid,ppid,stat,cmd | grep -F '${work}' | grep -v grep`]).stdout.toString(),
      );
      child.kill();
    }
    child.stdin.destroy();
    // Each redraw as its own line, as the eye saw them one after another.
    return fs
      .readFileSync(typescript, 'utf8')
      .replace(/\r\x1b\[2K/g, '\n')
      .replace(/\x1b\[[0-9;]*[A-Za-z]/g, '')
      .replace(/\r/g, '')
      .replace(/\n{2,}/g, '\n');
  };
  // Asynchronously: the WAN proxy runs in this process, and must go on forwarding meanwhile.
  const intoFile = async (argv: string[]) => {
    const child = spawn(argv[0], argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    child.stdout.on('data', (d) => (text += d));
    child.stderr.on('data', (d) => (text += d));
    const code = await new Promise((resolve) => child.on('close', resolve));
    return `${text}(exit ${code})`;
  };
  console.log(`Link: ${describeProfile(profile)}; models: 3 files, ${args.mib} MiB in all`);
  const backup = path.join(ROOT, 'backup-verda.mts');
  const restore = path.join(ROOT, 'restore-verda.mts');
  show('backup-verda.mts on a terminal', await onTerminal('backup', [backup]));
  show(
    'restore-verda.mts --only models --root DIR on a terminal',
    await onTerminal('restore', [restore, '--only', 'models', '--root', path.join(work, 'root1')]),
  );
  // Cron's log: a new model, so the next full run has something to send.
  writeRandomFile(path.join(verda.models, 'checkpoints/model-3.safetensors'), (args.mib * 1024 * 1024) / 3);
  show('backup-verda.mts into a file (as cron runs it)', await intoFile([backup]));
  show(
    'restore-verda.mts --only models --root DIR into a file',
    await intoFile([restore, '--only', 'models', '--root', path.join(work, 'root2')]),
  );
} finally {
  spawnSync('podman', ['rmi', '--force', IMAGE], { stdio: 'ignore' });
  await proxy.close();
  await sshd.stop();
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
}
