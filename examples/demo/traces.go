package main

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// The demo's trace viewer: Jaeger (scripts/install-jaeger.sh, started
// with jaeger.yaml) takes the nodes' and the apps' spans over OTLP/gRPC
// and keeps them in memory; the demo serves a page per trace, drawn from
// Jaeger's query API. Jaeger's own web UI is not part of its Go module
// (it is built from a JavaScript repository that neither the Go module
// proxy nor npm serves): a Jaeger built with it (JAEGER_UI_ASSETS, see the
// script) shows the same trace at jaegerUI/trace/<id>.
const (
	jaegerOTLP  = "127.0.0.1:4317"
	jaegerUI    = "127.0.0.1:16686"
	jaegerGRPC  = "127.0.0.1:16685"
	traceViewer = "127.0.0.1:16600"
)

//go:embed jaeger.yaml
var jaegerConfig []byte

// jaeger is the trace collector the demo runs.
type jaeger struct {
	cmd  *exec.Cmd
	done chan struct{}
	srv  *http.Server
}

// startJaeger starts Jaeger (MERIDIAN_JAEGER, which make demo sets from
// scripts/install-jaeger.sh) with its state and log in dir, and the trace
// page server; stop stops both.
func startJaeger(ctx context.Context, dir string) (*jaeger, error) {
	bin := os.Getenv("MERIDIAN_JAEGER")
	if bin == "" {
		return nil, errors.New("MERIDIAN_JAEGER is not set: make demo sets it from scripts/install-jaeger.sh")
	}
	cfg := filepath.Join(dir, "jaeger.yaml")
	if err := os.WriteFile(cfg, jaegerConfig, 0o644); err != nil {
		return nil, err
	}
	log, err := os.Create(filepath.Join(dir, "jaeger.log"))
	if err != nil {
		return nil, err
	}
	defer log.Close()
	port := func(a string) string { _, p, _ := net.SplitHostPort(a); return p }
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Env = append(os.Environ(), "MERIDIAN_JAEGER_OTLP_PORT="+port(jaegerOTLP), "MERIDIAN_JAEGER_UI_PORT="+port(jaegerUI),
		"MERIDIAN_JAEGER_QUERY_GRPC_PORT="+port(jaegerGRPC))
	cmd.Stdout, cmd.Stderr = log, log
	// Gone with the demo, however it ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start Jaeger (%s): %w", bin, err)
	}
	j := &jaeger{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(j.done) }()
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get("http://" + jaegerUI + "/api/services")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-j.done:
			return nil, fmt.Errorf("jaeger exited at start; its log: %s", filepath.Join(dir, "jaeger.log"))
		case <-ctx.Done():
			j.stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			j.stop()
			return nil, fmt.Errorf("the Jaeger API at %s did not answer within a minute; its log: %s", jaegerUI, filepath.Join(dir, "jaeger.log"))
		}
	}
	ln, err := net.Listen("tcp", traceViewer)
	if err != nil {
		j.stop()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /trace/{id}", serveTrace)
	j.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = j.srv.Serve(ln) }()
	return j, nil
}

// stop stops the page server and Jaeger, by its PID.
func (j *jaeger) stop() {
	if j.srv != nil {
		_ = j.srv.Close()
	}
	_ = j.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-j.done:
	case <-time.After(10 * time.Second):
		_ = j.cmd.Process.Kill()
		<-j.done
	}
}

// newTraceparent returns a traceparent header of a new trace, and the
// trace's ID.
func newTraceparent() (header, traceID string) {
	var b [24]byte
	_, _ = rand.Read(b[:])
	traceID = fmt.Sprintf("%x", b[:16])
	return fmt.Sprintf("00-%s-%x-01", traceID, b[16:]), traceID
}

// jaegerTrace is a trace as Jaeger's query API returns it.
type jaegerTrace struct {
	Spans []struct {
		SpanID        string `json:"spanID"`
		OperationName string `json:"operationName"`
		References    []struct {
			RefType string `json:"refType"`
			SpanID  string `json:"spanID"`
		} `json:"references"`
		StartTime int64 `json:"startTime"` // µs
		Duration  int64 `json:"duration"`  // µs
		Tags      []struct {
			Key   string `json:"key"`
			Value any    `json:"value"`
		} `json:"tags"`
		ProcessID string `json:"processID"`
	} `json:"spans"`
	Processes map[string]struct {
		ServiceName string `json:"serviceName"`
	} `json:"processes"`
}

// fetchTrace returns trace id from Jaeger.
func fetchTrace(ctx context.Context, id string) (*jaegerTrace, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+jaegerUI+"/api/traces/"+id, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("no trace %s in Jaeger yet (%s)", id, resp.Status)
	}
	var out struct {
		Data []jaegerTrace `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, err
	}
	if len(out.Data) == 0 {
		return nil, fmt.Errorf("no trace %s in Jaeger", id)
	}
	return &out.Data[0], nil
}

// awaitTrace waits until Jaeger has at least n spans of trace id.
func awaitTrace(ctx context.Context, id string, n int) (*jaegerTrace, error) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		t, err := fetchTrace(ctx, id)
		if err == nil && len(t.Spans) >= n {
			return t, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			if err == nil {
				err = fmt.Errorf("%d spans of %d", len(t.Spans), n)
			}
			return t, fmt.Errorf("trace %s not whole in Jaeger within 20s: %w", id, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// row is one span of the trace page.
type row struct {
	Depth              int
	Service, Operation string
	StartMS, DurMS     float64
	Left, Width        float64 // percent of the trace's time
	Details            string
	Indent             string
}

// rows orders t's spans as a tree, each after its parent, siblings by
// start time.
func rows(t *jaegerTrace) []row {
	if len(t.Spans) == 0 {
		return nil
	}
	children := map[string][]int{}
	ids := map[string]bool{}
	start, end := t.Spans[0].StartTime, int64(0)
	for _, s := range t.Spans {
		ids[s.SpanID] = true
		start, end = min(start, s.StartTime), max(end, s.StartTime+s.Duration)
	}
	var roots []int
	for i, s := range t.Spans {
		parent := ""
		for _, r := range s.References {
			if r.RefType == "CHILD_OF" && ids[r.SpanID] {
				parent = r.SpanID
			}
		}
		if parent == "" {
			roots = append(roots, i)
		} else {
			children[parent] = append(children[parent], i)
		}
	}
	byStart := func(a, b int) int { return int(t.Spans[a].StartTime - t.Spans[b].StartTime) }
	total := float64(max(end-start, 1))
	var out []row
	var walk func(i, depth int)
	walk = func(i, depth int) {
		s := t.Spans[i]
		var details []string
		for _, tag := range s.Tags {
			switch tag.Key {
			case "meridian.region", "meridian.replica", "meridian.txid", "meridian.lag_ms", "meridian.pages", "meridian.bytes",
				"meridian.outcome", "http.response.status_code":
				details = append(details, fmt.Sprintf("%s=%v", strings.TrimPrefix(tag.Key, "meridian."), tag.Value))
			}
		}
		out = append(out, row{
			Depth: depth, Service: t.Processes[s.ProcessID].ServiceName, Operation: s.OperationName,
			StartMS: float64(s.StartTime-start) / 1000, DurMS: float64(s.Duration) / 1000,
			Left: 100 * float64(s.StartTime-start) / total, Width: max(100*float64(s.Duration)/total, 0.3),
			Details: strings.Join(details, " "), Indent: strings.Repeat("\u00a0\u00a0\u00a0", depth),
		})
		c := children[s.SpanID]
		slices.SortFunc(c, byStart)
		for _, k := range c {
			walk(k, depth+1)
		}
	}
	slices.SortFunc(roots, byStart)
	for _, r := range roots {
		walk(r, 0)
	}
	return out
}

var tracePage = template.Must(template.New("trace").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>Trace {{.ID}}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222 }
table { border-collapse: collapse; width: 100% }
td, th { padding: 4px 8px; border-bottom: 1px solid #eee; text-align: left; white-space: nowrap }
td.bar { width: 45%; position: relative }
div.bar { position: absolute; top: 6px; height: 12px; background: #4a7bd0; border-radius: 2px }
.svc { color: #555 } .num { text-align: right; font-variant-numeric: tabular-nums } .small { color: #777; font-size: 12px }
</style></head><body>
<h1>One write, every region: trace {{.ID}}</h1>
<p>{{len .Rows}} spans, {{printf "%.1f" .TotalMS}} ms from the first to the last. Times are from the start of the trace.</p>
<table><tr><th>service</th><th>span</th><th class="num">start ms</th><th class="num">ms</th><th></th><th>attributes</th></tr>
{{range .Rows}}<tr><td class="svc">{{.Indent}}{{.Service}}</td><td>{{.Operation}}</td><td class="num">{{printf "%.1f" .StartMS}}</td><td class="num">{{printf "%.1f" .DurMS}}</td>
<td class="bar"><div class="bar" style="left: {{printf "%.2f" .Left}}%; width: {{printf "%.2f" .Width}}%"></div></td><td class="small">{{.Details}}</td></tr>
{{end}}</table>
<p class="small">Drawn by the Meridian demo from Jaeger's query API, <a href="{{.API}}">{{.API}}</a>.</p>
</body></html>
`))

// serveTrace draws a trace's page.
func serveTrace(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	t, err := fetchTrace(r.Context(), id)
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	rs := rows(t)
	var total float64
	for _, x := range rs {
		total = max(total, x.StartMS+x.DurMS)
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = tracePage.Execute(w, map[string]any{"ID": id, "Rows": rs, "TotalMS": total, "API": "http://" + jaegerUI + "/api/traces/" + id})
}

// screenshot renders url in headless Chromium, saves a PNG of it at png
// and returns the page's DOM.
func screenshot(ctx context.Context, url, png string) (string, error) {
	bin, err := exec.LookPath("chromium")
	if err != nil {
		return "", errors.New("no chromium on PATH: apt-get install -y chromium")
	}
	args := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=5000"}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(cctx, bin, append(args, "--window-size=1400,700", "--screenshot="+png, url)...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("chromium --screenshot: %w: %s", err, out)
	}
	dom, err := exec.CommandContext(cctx, bin, append(args, "--dump-dom", url)...).Output()
	if err != nil {
		return "", fmt.Errorf("chromium --dump-dom: %w", err)
	}
	return string(dom), nil
}
