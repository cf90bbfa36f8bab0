// Loads the daemon's status page in headless Chromium and prints the figures it shows as one JSON object.
// Usage: node status-page.mjs <url> <screenshot.png>   (run by tests/test_status_page.py)
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error('usage: node status-page.mjs <url> <screenshot.png>');
  process.exit(2);
}
const profile = mkdtempSync(join(tmpdir(), 'idv-status-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  viewport: { width: 1000, height: 800 },
});
const problems = [];
const requests = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (msg) => { if (msg.type() === 'error') problems.push(`console: ${msg.text()}`); });
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('request', (req) => requests.push(req.url()));
  const response = await page.goto(url, { waitUntil: 'load' });
  await page.waitForSelector('#in-flight');
  const figures = await page.evaluate(() => {
    const card = (id) => document.querySelector(`#${id} b`)?.textContent ?? null;
    const rows = (cls) =>
      [...document.querySelectorAll(`table.${cls} tbody tr`)].map((tr) =>
        [...tr.querySelectorAll('td')].map((td) => td.textContent));
    const counts = (cls) => Object.fromEntries(rows(cls).map(([k, v]) => [k, Number(v)]));
    return {
      title: document.title,
      ready: card('ready'),
      breaker: card('breaker'),
      in_flight: Number(card('in-flight')),
      in_doubt: Number(card('in-doubt')),
      provider_replays: Number(card('replays')),
      partitions: rows('partitions').map(([topic, partition, committed, lag]) => ({
        topic, partition: Number(partition), committed: Number(committed), lag: Number(lag),
      })),
      outcomes: counts('outcomes'),
      dispositions: counts('dispositions'),
      dead_letters: counts('dead-letters'),
      scripts: document.scripts.length,
      refresh: document.querySelector('meta[http-equiv="refresh"]')?.getAttribute('content') ?? null,
    };
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  // The page refreshes itself: wait for the next load.
  const reloaded = await page
    .waitForEvent('load', { timeout: 8000 })
    .then(() => true)
    .catch(() => false);
  const headers = response ? response.headers() : {};
  console.log(JSON.stringify({
    status: response ? response.status() : null,
    csp: headers['content-security-policy'] ?? null,
    figures,
    reloaded,
    requests,
    problems,
  }));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
