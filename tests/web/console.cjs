// Drives the banger web console in headless Chromium (Debian's /usr/bin/chromium) with playwright-core, as a
// person would: log in with the token URL, create a VM, watch it become ready, open its ports, follow a port's
// link, stop and delete it. Also tries what an attacker's page or a rebinding DNS name would. Run by
// tests/tests/web_console.rs inside the test daemon's network namespace; it fails (exit 1) on the first wrong
// thing it sees.
//
// Usage: node console.cjs vm|image. Environment: BANGER_TEST_PLAYWRIGHT (the playwright-core package folder),
// WEB_URL (login URL), SHOTS (folder for screenshots); for `vm` VM_NAME (between "ready" and "ports" it prints
// `READY` and waits for a line on stdin, so the Rust test can start a web server in the guest); for `image`
// QUICK_SCRIPT and SLOW_SCRIPT (host customize scripts: one that finishes, one that hangs until cancelled).
"use strict";
const http = require("node:http");
const fs = require("node:fs");
const path = require("node:path");
const readline = require("node:readline");
const { chromium } = require(process.env.BANGER_TEST_PLAYWRIGHT);

const loginUrl = process.env.WEB_URL;
const base = new URL(loginUrl).origin;
const shots = process.env.SHOTS;
const vmName = process.env.VM_NAME;
const stdin = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => stdin.once("line", resolve));

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
  console.log("ok: " + what);
}

async function shot(page, name) {
  const file = path.join(shots, name + ".png");
  await page.screenshot({ path: file, fullPage: true });
  console.log("screenshot: " + file);
}

// A raw HTTP request, so headers a browser would never let a page set (Host) can be tried.
function raw(method, urlPath, headers, body) {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const req = http.request({ host: u.hostname, port: u.port, method, path: urlPath, headers }, (res) => {
      let data = "";
      res.on("data", (c) => (data += c));
      res.on("end", () => resolve({ status: res.statusCode, body: data }));
    });
    req.on("error", reject);
    req.setTimeout(20000, () => req.destroy(new Error(method + " " + urlPath + ": no answer in 20 s")));
    if (body) req.write(body);
    req.end();
  });
}

async function main() {
  const scenario = process.argv[2];
  if (scenario !== "vm" && scenario !== "image") throw new Error("usage: console.cjs vm|image");
  fs.mkdirSync(shots, { recursive: true });
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  try {
    // launch() gives each context a fresh profile in a temporary --user-data-dir.
    const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(30000);

    // Without logging in, everything leads to the login page.
    await page.goto(base + "/vms");
    check(new URL(page.url()).pathname === "/login", "an anonymous visit is sent to /login");
    const wrong = await page.goto(base + "/login?token=" + "0".repeat(64));
    check(wrong.status() === 403, "a wrong token is refused");

    await page.goto(loginUrl);
    check(new URL(page.url()).pathname === "/", "the token URL logs in and lands on the dashboard");
    if (scenario === "image") return await images(page);
    check((await page.textContent("h1")) === "Dashboard", "the dashboard shows");
    check((await page.textContent("#host")).includes("CPUs"), "the dashboard shows host resources");
    await shot(page, "01-dashboard");

    const session = (await context.cookies()).find((c) => c.name === "banger_session");
    check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
    const csrf = await page.getAttribute("meta[name=csrf]", "content");
    const cookie = "banger_session=" + session.value;
    const form = "application/x-www-form-urlencoded";

    // An attacker's page in the same browser posts a create form to the console.
    const evil = await context.newPage();
    await evil.setContent(
      `<form method="post" action="${base}/vms"><input name="name" value="csrf-victim"></form>`
    );
    const [evilRes] = await Promise.all([
      evil.waitForResponse((r) => r.url() === base + "/vms"),
      evil.evaluate(() => document.forms[0].submit()),
    ]);
    check(evilRes.status() === 403, "a cross-site form POST from another page is refused (403)");
    // Closing a page that is still settling its navigation can hang in headless Chromium here: do not wait
    // on it for more than a few seconds (the context closes it at the end anyway).
    await Promise.race([evil.close(), new Promise((r) => setTimeout(r, 5000))]);
    console.log("ok: the attacker's page is closed or left behind");

    // The same, with the victim's cookie but no CSRF token (as if SameSite did not exist).
    let r = await raw("POST", "/vms", { Host: new URL(base).host, Cookie: cookie, "Content-Type": form }, "name=csrf-victim");
    check(r.status === 403 && r.body.includes("CSRF"), "a POST with the session cookie but without the CSRF token is refused");
    r = await raw("POST", "/vms", { Host: new URL(base).host, Cookie: cookie, "Content-Type": form, Origin: "http://evil.example" },
      "csrf=" + csrf + "&name=csrf-victim");
    check(r.status === 403 && r.body.includes("cross-site"), "a POST with a foreign Origin is refused, even with the token");
    r = await raw("GET", "/", { Host: "evil.example", Cookie: cookie });
    check(r.status === 403 && r.body.includes("evil.example"), "a request with Host: evil.example is refused (DNS rebinding)");
    r = await raw("GET", "/login?token=x", { Host: "evil.example:" + new URL(base).port });
    check(r.status === 403, "even /login refuses a foreign Host");

    // Create a VM through the form and watch its operation live.
    await page.click("nav >> text=New VM");
    await page.fill("#name", vmName);
    await page.fill("input[name=memory_mib]", "256");
    await Promise.all([page.waitForURL(/\/operations\//), page.click("#create")]);
    check((await page.textContent("h1")).includes(vmName), "the create operation page names the VM");
    await shot(page, "02-creating");
    await page.waitForSelector("#op-state[data-state=succeeded]", { timeout: 240000 });
    check((await page.locator("#stages li").count()) >= 3, "the operation page lists the create's stages");
    await shot(page, "03-created");
    await Promise.all([page.waitForURL(new RegExp("/vms/" + vmName + "$")), page.click("#open-vm")]);
    check((await page.getAttribute("#vm .state", "data-state")) === "running", "the VM page shows it running");
    check((await page.textContent("#vm")).includes(vmName + ".vm"), "the VM page shows its DNS name");
    check((await page.locator("#stats dt").count()) > 0, "the VM page shows stats");
    await shot(page, "04-vm");

    console.log("READY");
    await nextLine();

    await Promise.all([page.waitForURL(/\/ports$/), page.click("#ports")]);
    const link = page.locator(`#port-list a[href="http://${vmName}.vm:8080/"]`);
    check((await link.count()) === 1, "the ports page links the guest's web server as http://" + vmName + ".vm:8080/");
    await shot(page, "05-ports");
    const [served] = await Promise.all([context.waitForEvent("page"), link.click()]);
    await served.waitForLoadState();
    check((await served.textContent("body")).includes("served-by-" + vmName), "the port link opens the guest's page");
    await shot(served, "06-guest-page");
    await served.close();

    await page.goto(base + "/vms/" + vmName);
    const sessions = await page.textContent("#sessions");
    check(sessions.includes("webjob") && sessions.includes("running"), "the VM page lists its running session: " + sessions);
    await Promise.all([page.waitForURL(/\/confirm\/stop$/), page.click("#stop")]);
    await shot(page, "07-confirm-stop");
    await Promise.all([page.waitForURL(new RegExp("/vms/" + vmName + "$")), page.click("#confirm")]);
    await page.waitForSelector("#vm .state[data-state=stopped]", { timeout: 120000 });
    await shot(page, "08-stopped");

    await Promise.all([page.waitForURL(/\/confirm\/delete$/), page.click("#delete")]);
    check((await page.textContent("main")).includes("cannot be undone"), "delete asks for confirmation");
    await Promise.all([page.waitForURL(/\/vms$/), page.click("#confirm")]);
    check(!(await page.textContent("main")).includes(vmName), "the VM list no longer shows the deleted VM");
    await shot(page, "09-deleted");
  } finally {
    // Bounded, like closing the attacker's page: a hung close must not hang the test (exit ends Chromium).
    await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 10000))]);
  }
}

// Builds an image from the form and watches its stages arrive live; starts a second that hangs and cancels it.
async function images(page) {
  await page.click("nav >> text=Images");
  await page.fill("#image-name", "webbuilt");
  await page.selectOption("#image-from", "test");
  await page.fill("#image-script", process.env.QUICK_SCRIPT);
  await Promise.all([page.waitForURL(/\/operations\//), page.click("#build")]);
  // Marks this document: if it is still there when the build has finished, the page updated itself.
  await page.evaluate(() => (window.__sameDocument = true));
  await shot(page, "10-build-running");
  await page.waitForSelector("#op-state[data-state=succeeded]", { timeout: 240000 });
  check(await page.evaluate(() => window.__sameDocument === true), "the build's stages arrived live, without a reload");
  check((await page.locator("#stages .stage-done").count()) === 4, "all four build stages are done");
  check((await page.textContent("#built")).includes("webbuilt"), "the page says the image is ready");
  check((await page.locator("#cancel").count()) === 0, "a finished build offers no cancel");
  await shot(page, "11-build-done");

  await page.click("nav >> text=Images");
  check((await page.textContent("#images")).includes("webbuilt"), "the images list shows the new image");
  await page.fill("#image-name", "webslow");
  await page.selectOption("#image-from", "test");
  await page.fill("#image-script", process.env.SLOW_SCRIPT);
  await Promise.all([page.waitForURL(/\/operations\//), page.click("#build")]);
  await page.waitForSelector("#stages .stage-running >> text=customize", { timeout: 120000 });
  await shot(page, "12-build-customizing");
  await Promise.all([page.waitForURL(/\/operations\/[^/]+$/), page.click("#cancel")]);
  await page.waitForSelector("#op-state[data-state=cancelled]", { timeout: 60000 });
  await shot(page, "13-build-cancelled");
  await page.click("nav >> text=Images");
  check(!(await page.textContent("main")).includes("webslow"), "the cancelled build registered nothing");
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e && e.stack ? e.stack : e);
    process.exit(1);
  }
);
