// Command guestbook is a small web app on SQLite that runs unchanged in
// every region of a Meridian cluster: HTML pages and a JSON API on
// database/sql, with a page that streams new entries (server-sent events)
// and a WebSocket echo.
//
// It knows nothing of replication. It opens the database file it is
// given (MERIDIAN_DB, or -db), runs its schema migration only where the
// database is writable, and shows on every page which region and node
// served it and the database's position (the mount's -pos file). Writes
// reach it only on the primary: the router in front sends them there.
//
//	regiond run -config regiond.yml -- guestbook
//	guestbook -db /data/app.db -listen 127.0.0.1:3000
package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mattn/go-sqlite3"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "guestbook: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("guestbook", flag.ContinueOnError)
	dbPath := fl.String("db", envOr("MERIDIAN_DB", "app.db"), "the SQLite database `file` (MERIDIAN_DB)")
	listen := fl.String("listen", envOr("MERIDIAN_LISTEN", "127.0.0.1:3000"), "`host:port` to serve on (MERIDIAN_LISTEN)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	db, err := sql.Open("sqlite3", "file:"+*dbPath+"?_busy_timeout=5000&_txlock=immediate")
	if err != nil {
		return err
	}
	defer db.Close()
	a := &app{db: db, path: *dbPath, node: envOr("MERIDIAN_NODE", hostname()), region: envOr("MERIDIAN_REGION", "local"), log: slog.Default()}
	go a.migrate(ctx)
	handler, flush, err := traced(ctx, a.routes(), a.region)
	if err != nil {
		return err
	}
	defer func() {
		fctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_ = flush(fctx)
	}()
	srv := &http.Server{Addr: *listen, Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	a.log.Info("guestbook listening", "addr", *listen, "db", *dbPath, "node", a.node, "region", a.region)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	a.closing.Store(true)
	_ = srv.Shutdown(sctx)
	return nil
}

type app struct {
	db           *sql.DB
	path         string
	node, region string
	log          *slog.Logger
	ready        atomic.Bool // the schema is there
	closing      atomic.Bool
}

// schema is the app's one migration.
const schema = `CREATE TABLE IF NOT EXISTS entries (
	id         INTEGER PRIMARY KEY,
	name       TEXT NOT NULL,
	message    TEXT NOT NULL,
	region     TEXT NOT NULL,
	node       TEXT NOT NULL,
	created_at TEXT NOT NULL
)`

// migrate makes the schema where the database is writable, and waits for
// it (made by the primary, replicated) where it is not.
func (a *app) migrate(ctx context.Context) {
	for ctx.Err() == nil {
		var n int
		err := a.db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_schema WHERE name = 'entries'`).Scan(&n)
		if err == nil && n == 1 {
			a.ready.Store(true)
			return
		}
		if a.writable() {
			if _, err := a.db.ExecContext(ctx, `PRAGMA journal_mode=WAL`); err != nil {
				a.log.Warn("migrate: journal mode", "err", err)
			} else if _, err := a.db.ExecContext(ctx, schema); err != nil {
				a.log.Warn("migrate", "err", err)
			} else {
				a.log.Info("migrated the schema", "db", a.path)
				a.ready.Store(true)
				return
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// writable reports whether this node takes writes: its mount has no
// .primary file naming another node.
func (a *app) writable() bool {
	_, err := os.Stat(filepath.Join(filepath.Dir(a.path), ".primary"))
	return errors.Is(err, os.ErrNotExist)
}

// exec runs a write. SQLite opens a connection read-only for good when
// the file cannot be opened for writing, as on a replica's mount; once
// this node has become the primary such a connection still fails every
// write with SQLITE_READONLY. Then it is dropped from the pool and the
// write runs again on a new connection.
func (a *app) exec(ctx context.Context, query string, args ...any) (sql.Result, error) {
	for attempt := 0; ; attempt++ {
		conn, err := a.db.Conn(ctx)
		if err != nil {
			return nil, err
		}
		res, err := conn.ExecContext(ctx, query, args...)
		var se sqlite3.Error
		if errors.As(err, &se) && se.Code == sqlite3.ErrReadonly && attempt < 8 && a.writable() {
			_ = conn.Raw(func(any) error { return driver.ErrBadConn }) // closes it
			_ = conn.Close()
			continue
		}
		_ = conn.Close()
		return res, err
	}
}

// where is what every page says of who served it.
type where struct {
	Node, Region, Role, Primary, Pos string
}

func (a *app) where() where {
	w := where{Node: a.node, Region: a.region, Role: "primary"}
	if b, err := os.ReadFile(filepath.Join(filepath.Dir(a.path), ".primary")); err == nil {
		w.Role, w.Primary = "replica", strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(a.path + "-pos"); err == nil {
		w.Pos = strings.TrimSpace(string(b))
	}
	return w
}

type entry struct {
	ID        int64  `json:"id"`
	Name      string `json:"name"`
	Message   string `json:"message"`
	Region    string `json:"region"`
	Node      string `json:"node"`
	CreatedAt string `json:"created_at"`
}

func (a *app) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", a.index)
	mux.HandleFunc("GET /live", a.live)
	mux.HandleFunc("POST /entries", a.create)
	mux.HandleFunc("GET /api/entries", a.list)
	mux.HandleFunc("GET /api/entries/{id}", a.get)
	mux.HandleFunc("GET /api/where", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, a.where()) })
	mux.HandleFunc("GET /events", a.events)
	mux.HandleFunc("GET /ws", a.echo)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	return mux
}

func (a *app) entries(ctx context.Context, afterID int64, limit int) ([]entry, error) {
	rows, err := a.db.QueryContext(ctx, `SELECT id, name, message, region, node, created_at FROM entries WHERE id > ? ORDER BY id DESC LIMIT ?`, afterID, limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []entry{}
	for rows.Next() {
		var e entry
		if err := rows.Scan(&e.ID, &e.Name, &e.Message, &e.Region, &e.Node, &e.CreatedAt); err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

var page = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Guestbook · {{.W.Region}}</title>
<style>body{font:16px system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}
header{background:#f3f3f3;padding:.5rem 1rem;border-radius:6px}li{margin:.3rem 0}small{color:#666}</style></head>
<body><header>Served by <b>{{.W.Node}}</b> in region <b>{{.W.Region}}</b> ({{.W.Role}}{{if .W.Primary}} of {{.W.Primary}}{{end}}) · database at <code>{{.W.Pos}}</code></header>
{{if .Live}}<h1>New entries, live</h1><ul id="live"></ul>
<script>const es=new EventSource("/events");es.addEventListener("entry",e=>{const d=JSON.parse(e.data);const li=document.createElement("li");
li.textContent=d.name+": "+d.message+" ("+d.region+")";document.getElementById("live").prepend(li)});</script>
{{else}}<h1>Guestbook</h1>
<form method="post" action="/entries"><input name="name" placeholder="name" required> <input name="message" placeholder="message" required size="40"> <button>Sign</button></form>
{{if .Err}}<p>{{.Err}}</p>{{end}}
<ul>{{range .Entries}}<li>#{{.ID}} <b>{{.Name}}</b>: {{.Message}} <small>from {{.Region}} via {{.Node}}, {{.CreatedAt}}</small></li>{{end}}</ul>
<p><a href="/live">Watch new entries live</a> · <a href="/api/entries">JSON</a></p>{{end}}
</body></html>`))

func (a *app) index(w http.ResponseWriter, r *http.Request) {
	data := struct {
		W       where
		Entries []entry
		Err     string
		Live    bool
	}{W: a.where()}
	es, err := a.entries(r.Context(), 0, 50)
	if err != nil {
		data.Err = "No entries to show yet: " + a.dbError(err)
	}
	data.Entries = es
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = page.Execute(w, data)
}

func (a *app) live(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = page.Execute(w, struct {
		W    where
		Live bool
	}{a.where(), true})
}

// dbError says what a failed query means to a visitor.
func (a *app) dbError(err error) string {
	if !a.ready.Load() {
		return "the database has not reached this region yet (" + err.Error() + ")"
	}
	return err.Error()
}

// create adds an entry: a form post (answered with a redirect to the
// page) or JSON (answered 201 with the entry).
func (a *app) create(w http.ResponseWriter, r *http.Request) {
	isJSON := strings.HasPrefix(r.Header.Get("Content-Type"), "application/json")
	var e entry
	if isJSON {
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&e); err != nil {
			http.Error(w, "bad JSON: "+err.Error(), http.StatusBadRequest)
			return
		}
	} else {
		e.Name, e.Message = r.FormValue("name"), r.FormValue("message")
	}
	if e.Name == "" || e.Message == "" {
		http.Error(w, "name and message are required", http.StatusBadRequest)
		return
	}
	e.Region, e.Node, e.CreatedAt = a.region, a.node, time.Now().UTC().Format(time.RFC3339Nano)
	res, err := a.exec(r.Context(), `INSERT INTO entries (name, message, region, node, created_at) VALUES (?, ?, ?, ?, ?)`,
		e.Name, e.Message, e.Region, e.Node, e.CreatedAt)
	if err != nil {
		a.log.Warn("insert", "err", err)
		http.Error(w, "could not save the entry: "+a.dbError(err), http.StatusInternalServerError)
		return
	}
	e.ID, _ = res.LastInsertId()
	if !isJSON {
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	writeJSON(w, http.StatusCreated, e)
}

func (a *app) list(w http.ResponseWriter, r *http.Request) {
	after, _ := strconv.ParseInt(r.URL.Query().Get("after"), 10, 64)
	es, err := a.entries(r.Context(), after, 100)
	if err != nil {
		http.Error(w, a.dbError(err), http.StatusServiceUnavailable)
		return
	}
	writeJSON(w, http.StatusOK, es)
}

func (a *app) get(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		http.Error(w, "bad id", http.StatusBadRequest)
		return
	}
	var e entry
	err = a.db.QueryRowContext(r.Context(), `SELECT id, name, message, region, node, created_at FROM entries WHERE id = ?`, id).
		Scan(&e.ID, &e.Name, &e.Message, &e.Region, &e.Node, &e.CreatedAt)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		http.Error(w, fmt.Sprintf("no entry %d in %s's database", id, a.node), http.StatusNotFound)
	case err != nil:
		http.Error(w, a.dbError(err), http.StatusServiceUnavailable)
	default:
		writeJSON(w, http.StatusOK, e)
	}
}

// events streams entries added after the request began (or after the id
// in Last-Event-ID) as server-sent events named "entry". The app learns of
// new rows by asking the database a few times a second.
func (a *app) events(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	var last int64
	if id, err := strconv.ParseInt(r.Header.Get("Last-Event-ID"), 10, 64); err == nil {
		last = id
	} else {
		_ = a.db.QueryRowContext(r.Context(), `SELECT coalesce(max(id), 0) FROM entries`).Scan(&last)
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	fmt.Fprintf(w, ": %s in %s\n\n", a.node, a.region)
	fl.Flush()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !a.closing.Load() {
		select {
		case <-r.Context().Done():
			return
		case <-tick.C:
		}
		es, err := a.entries(r.Context(), last, 100)
		if err != nil {
			continue
		}
		for i := len(es) - 1; i >= 0; i-- {
			b, _ := json.Marshal(es[i])
			fmt.Fprintf(w, "id: %d\nevent: entry\ndata: %s\n\n", es[i].ID, b)
			last = es[i].ID
		}
		if len(es) > 0 {
			fl.Flush()
		}
	}
}

var upgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}

// echo is a WebSocket that answers each message with the node's name and
// the message.
func (a *app) echo(w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer conn.Close()
	for {
		mt, b, err := conn.ReadMessage()
		if err != nil {
			return
		}
		if err := conn.WriteMessage(mt, []byte(a.node+": "+string(b))); err != nil {
			return
		}
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}
