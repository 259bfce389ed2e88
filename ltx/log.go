package ltx

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/internal/durable"
)

// Defaults for Log tunables.
const (
	DefaultRetention      = 10 * time.Minute
	DefaultMaxRetention   = 24 * time.Hour
	DefaultCompactionSize = 16 << 20
)

// corruptDir is the subdirectory of a log directory where Open moves a torn
// or corrupt last file, so it is out of the log but not deleted.
const corruptDir = "corrupt"

// Log is the LTX log of one database: a directory of LTX files, contiguous
// in TXID, each applying at the position the one before it left. It knows
// its current position and, when it has a database file, the checksum of
// every page of it.
//
// Methods are safe for concurrent use. Writers (Commit, Apply, Prune,
// Compact) serialize where they change the same files; readers (Pos,
// Files, cursors) are not held up by a writer's disk I/O.
type Log struct {
	Name   string // database name, used in errors and logs
	Dir    string // directory of LTX files
	DBPath string // database file the log describes; "" for a log alone

	// DB, if set, reads the database the log describes in place of the
	// file at DBPath, which then only names it in messages: for a database
	// whose current content is not one file (SQLite in WAL mode).
	DB Database

	// NodeID is stamped into the header of files the log builds.
	NodeID uint64

	// Retention is how long a file is kept after every replica has
	// acknowledged it; MaxRetention is how long it is kept at most.
	Retention    time.Duration
	MaxRetention time.Duration

	// CompactionSize bounds the input bytes merged into one compacted file.
	CompactionSize int64

	// SegmentSize and SegmentAge are when the log starts a new segment
	// (see segment.go): at this size, or this old. A SegmentSize of 0
	// writes each committed transaction to a file of its own instead.
	SegmentSize int64
	SegmentAge  time.Duration

	Logger *slog.Logger

	// MayBeUnsynced, if set, tells Open which files a power failure may
	// have emptied or torn though a later file survived whole: files
	// written without an fsync since the log was last synced, whose
	// transactions their writer can write again (in WAL mode, the files of
	// the WAL's current generation: the log is synced before a checkpoint
	// writes the database and before the WAL restarts). An unreadable
	// file followed only by such files is moved aside, with every file
	// after it, as a torn last file is, instead of stopping Open.
	MayBeUnsynced func(Header) bool

	// Spares, if set, recycles files: new files are written over spares
	// and removed files become spares, unless a reader has them open.
	Spares *Spares

	// Committed, if set, is called with each file Commit or
	// Prepared.Commit records, in order, before they return. It must
	// not block: the log's next commit waits for it.
	Committed func(FileInfo)

	readers atomic.Int32 // files open for reading
	// waiting counts the cursors blocked in Next until the log changes. A
	// cursor counts itself while it still holds mu: once it is counted,
	// the next change (a commit, Close) wakes it.
	waiting atomic.Int32

	wmu      sync.Mutex // held by Open, Commit and Sync
	unsynced []*logFile // files committed with NoSync; guarded by wmu
	seg      *segment   // the segment appended to; guarded by wmu
	// dirUnsynced: files were renamed into Dir without a directory fsync
	// since the last Sync; guarded by wmu
	dirUnsynced bool
	// maint is held while files leave the log other than by Open: by
	// Prune, by a compaction opening its files and putting the compacted
	// file in their place, and by a snapshot's apply until the list holds
	// its files. Taken after wmu, before mu.
	maint sync.Mutex

	// applying is the name in the apply marker when Open began, if any:
	// the first file of a group an apply did not finish.
	applying string
	// marker is the apply marker, open for the groups applySegment
	// writes, and marked the first TXID of the group it durably names, 0
	// if none is known to be durable. unapplied is a group appended to
	// the segment whose apply failed, taken off before the next. All
	// guarded by wmu.
	marker    *os.File
	marked    TXID
	unapplied *unappliedGroup
	// group is the fsync in flight of the records of the last group
	// applied with ApplyOptions.Overlap; changed under wmu. markWritten
	// is the first TXID of the group the marker names, durably or not.
	group       atomic.Pointer[groupSync]
	markWritten TXID
	// spare is a copy of the checksum table as it was at generation
	// spareGen, for the next apply to change in place rather than copy
	// a table as large as the database (see scratchTable). Guarded by
	// wmu.
	spare    *ChecksumTable
	spareOf  *ChecksumTable
	spareGen uint64
	// recents are the files whose bytes are kept in memory, oldest
	// first, recentBytes their size. Guarded by mu.
	recents     []*logFile
	recentBytes int

	mu      sync.RWMutex // guards the fields below
	opened  bool
	closed  bool
	files   []*logFile
	table   *ChecksumTable // nil without a database
	changed chan struct{}  // closed and replaced when the log changes
}

// logFile is a file in the log. Fields do not change once it is in
// Log.files.
type logFile struct {
	info FileInfo
	// positions holds the checksum after each TXID in the file when a
	// sidecar recorded them (compacted files); nil otherwise.
	positions []Checksum
	// readers counts the open readers of the file: one that is removed
	// while read is deleted, never recycled as a spare.
	readers atomic.Int32
	// seg is the segment the file is in, at offset off; nil for a file
	// of its own.
	seg *segment
	off int64
	// mem holds the file's bytes while a group is applied from memory
	// (ApplyOptions.Data), sparing a read of what was just appended;
	// nil otherwise. Set and cleared under wmu.
	mem []byte
	// recent holds the bytes of a file this log committed lately, as
	// the encoder wrote them, for cursors to serve without reading them
	// back from disk (see Log.keepRecent). Guarded by the log's mu.
	recent []byte
}

// open opens f for reading. Caller holds l.mu, or l.maint, while f is in
// l.files, so that a removal sees the reader.
func (l *Log) open(f *logFile) (*openFile, error) {
	f.readers.Add(1)
	l.readers.Add(1)
	name := f.info.Name
	if f.seg != nil {
		name = f.seg.name
	}
	fh, err := os.Open(l.path(name))
	if err != nil {
		f.readers.Add(-1)
		l.readers.Add(-1)
		return nil, err
	}
	of := &openFile{File: fh, lf: f, l: l, r: fh}
	if f.seg != nil {
		of.r = io.NewSectionReader(fh, f.off, f.info.Size)
	}
	return of, nil
}

// Readers returns the number of the log's files open for reading through
// it, removed ones included until they are closed.
func (l *Log) Readers() int { return int(l.readers.Load()) }

// openFile is a file of the log open for reading: its bytes alone,
// whether it is a file of its own or in a segment.
type openFile struct {
	*os.File
	r    io.Reader
	lf   *logFile
	l    *Log
	once sync.Once
}

// Read reads the file's bytes.
func (f *openFile) Read(p []byte) (int, error) { return f.r.Read(p) }

// Close closes the file and counts its reader out.
func (f *openFile) Close() error {
	err := f.File.Close()
	f.once.Do(func() {
		f.lf.readers.Add(-1)
		f.l.readers.Add(-1)
	})
	return err
}

// NewLog returns a log of the database name, kept in dir, describing the
// database file at dbPath ("" for none). Call Open before use.
func NewLog(name, dir, dbPath string) *Log {
	return &Log{
		Name:           name,
		Dir:            dir,
		DBPath:         dbPath,
		Retention:      DefaultRetention,
		MaxRetention:   DefaultMaxRetention,
		CompactionSize: DefaultCompactionSize,
		SegmentSize:    DefaultSegmentSize,
		SegmentAge:     DefaultSegmentAge,
		Logger:         slog.Default(),
	}
}

// Open reads the log directory, creating it if needed, and recovers it:
// unfinished temporary files are removed; files superseded by a compacted
// file are removed; a last file that is torn or corrupt is moved to the
// "corrupt" subdirectory, never applied. The rest must form one contiguous
// chain, or Open fails naming the files at fault and changes nothing else.
//
// With a database, Open computes its checksum table and checks it against
// the log's position, failing with a *DatabaseMismatchError if they
// differ. A database with no log starts one: its current content becomes a
// snapshot at TXID 1.
func (l *Log) Open(ctx context.Context) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.opened {
		return fmt.Errorf("log %s: already open", l.Dir)
	}
	if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return fmt.Errorf("create log directory: %w", err)
	}
	files, err := l.recover()
	if err != nil {
		return err
	}
	l.files, l.changed, l.opened = files, make(chan struct{}), true
	if l.DBPath == "" && l.DB == nil {
		return nil // the log alone: the marker stays for an Open with the database
	}
	if err := l.openDatabase(ctx); err != nil {
		l.opened = false
		return err
	}
	if l.applying != "" {
		// The database is where the log is: a marker left naming a group
		// applied whole must not name the files committed after it, which
		// Open would cut as an unfinished group's.
		if err := durable.WriteFile(l.path(applyingName), nil); err != nil {
			return fmt.Errorf("log %s: empty the apply marker: %w", l.Dir, err)
		}
		l.applying = ""
	}
	return nil
}

// Close stops cursors waiting on the log. It does not wait for writers:
// the segment being appended to is closed now if no writer holds it, else
// by the next writer, which finds the log closed.
func (l *Log) Close() error {
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		if l.changed != nil {
			close(l.changed)
		}
	}
	l.mu.Unlock()
	if l.wmu.TryLock() {
		if err := l.settle(); err != nil {
			l.Logger.Error("close the log", "db", l.Name, "err", err)
		}
		l.closeSegment()
		l.wmu.Unlock()
	}
	return nil
}

// closeSegment closes the segment being appended to, if any, leaving it
// for Open to read again, and the apply marker. Caller holds l.wmu.
func (l *Log) closeSegment() {
	if s := l.seg; s != nil {
		l.seg = nil
		s.active.Store(false)
		s.close()
	}
	if l.marker != nil {
		_ = l.marker.Close()
		l.marker, l.marked, l.markWritten = nil, 0, 0
	}
}

// Pos returns the position after the last transaction in the log, or the
// zero position for an empty log.
func (l *Log) Pos() Pos {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.pos()
}

func (l *Log) pos() Pos {
	if len(l.files) == 0 {
		return Pos{}
	}
	return l.files[len(l.files)-1].info.Pos()
}

// First returns the oldest position a reader can start from.
func (l *Log) First() Pos {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if len(l.files) == 0 {
		return Pos{}
	}
	return l.files[0].info.PreApplyPos()
}

// Files returns the files in the log, oldest first.
func (l *Log) Files() []FileInfo {
	l.mu.RLock()
	defer l.mu.RUnlock()
	a := make([]FileInfo, len(l.files))
	for i, f := range l.files {
		a[i] = f.info
	}
	return a
}

// Checksum returns the database checksum from the page checksum table, and
// its size in pages. It is 0, 0 for a log without a database.
func (l *Log) Checksum() (Checksum, uint32) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.table == nil {
		return 0, 0
	}
	return l.table.Checksum(), l.table.Pages()
}

// notify wakes cursors waiting in Next. Caller holds l.mu. After Close,
// which closed the channel for good, there is no one left to wake: a
// commit in flight when the log closed still completes.
func (l *Log) notify() {
	if l.closed {
		return
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

func (l *Log) checkOpen() error {
	if l.closed {
		return ErrClosed
	} else if !l.opened {
		return fmt.Errorf("log %s: not open", l.Dir)
	}
	return nil
}

func (l *Log) path(name string) string { return filepath.Join(l.Dir, name) }

// recover reads and repairs the directory as Open describes.
func (l *Log) recover() ([]*logFile, error) {
	entries, err := os.ReadDir(l.Dir)
	if err != nil {
		return nil, fmt.Errorf("read log directory: %w", err)
	}
	var (
		files    []*logFile
		bad      []badFile
		sidecars = map[string]bool{}
		segments []*segment
		indexes  = map[string]bool{}
	)
	if b, err := os.ReadFile(l.path(applyingName)); err == nil {
		l.applying = string(b)
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case e.IsDir():
			continue
		case strings.HasSuffix(name, tmpExt):
			if err := os.Remove(l.path(name)); err != nil {
				return nil, fmt.Errorf("remove unfinished file: %w", err)
			}
			l.Logger.Info("removed unfinished file from the log", "db", l.Name, "file", name)
		case name == applyingName:
			// Read by openDatabase: the file Apply was writing.
		case strings.HasSuffix(name, posExt):
			sidecars[name] = true
		case strings.HasSuffix(name, idxExt):
			indexes[name] = true
		case strings.HasSuffix(name, segExt):
			seg, in, err := l.openSegment(name)
			if err != nil {
				return nil, err
			}
			segments = append(segments, seg)
			files = append(files, in...)
		case strings.HasSuffix(name, ltxExt):
			if _, _, err := ParseName(name); err != nil {
				return nil, fmt.Errorf("log %s: %v: rename or move it out of the log directory", l.Dir, err)
			}
			info, err := ReadFileInfo(l.path(name))
			if errors.Is(err, ErrCorrupt) {
				bad = append(bad, badFile{name, err})
				continue
			} else if err != nil {
				return nil, fmt.Errorf("log %s: %w", l.Dir, err)
			}
			files = append(files, &logFile{info: *info})
		default:
			l.Logger.Warn("ignoring a file that is not part of the log", "db", l.Name, "file", name)
		}
	}
	slices.SortFunc(files, func(a, b *logFile) int {
		if c := cmp.Compare(a.info.Header.MinTXID, b.info.Header.MinTXID); c != 0 {
			return c
		}
		return cmp.Compare(b.info.Header.MaxTXID, a.info.Header.MaxTXID)
	})

	files, err = l.removeSuperseded(files)
	if err != nil {
		return nil, err
	}
	if files, err = l.quarantineBad(files, bad); err != nil {
		return nil, err
	}
	if err := l.checkChain(files); err != nil {
		return nil, err
	}
	if files, err = l.verifyLast(files); err != nil {
		return nil, err
	}
	if err := l.sealAll(files); err != nil {
		return nil, err
	}
	if err := l.loadSidecars(files, sidecars); err != nil {
		return nil, err
	}
	for _, seg := range segments {
		delete(indexes, indexName(seg.name))
		if seg.live.Load() == 0 {
			if err := l.removeSegment(seg); err != nil {
				return nil, err
			}
		}
	}
	for name := range indexes {
		// The index of a segment removed before it.
		if err := removeIfExists(l.path(name)); err != nil {
			return nil, err
		}
	}
	return files, syncDirectory(l.Dir)
}

// removeSuperseded drops files whose TXID range lies inside another file's:
// the inputs of a compaction that was interrupted before it removed them.
// The covering file is verified first.
func (l *Log) removeSuperseded(files []*logFile) ([]*logFile, error) {
	var kept []*logFile
	var verified *logFile
	for _, f := range files {
		if n := len(kept); n > 0 && f.info.Header.MaxTXID <= kept[n-1].info.Header.MaxTXID {
			cover := kept[n-1]
			if cover != verified {
				if _, err := VerifyFile(l.path(cover.info.Name)); err != nil {
					return nil, fmt.Errorf("log %s: %s overlaps %s, which does not verify: %w", l.Dir, f.info.Name, cover.info.Name, err)
				}
				verified = cover
			}
			if err := l.removeFile(f); err != nil {
				return nil, err
			}
			l.Logger.Info("removed file superseded by a compacted file", "db", l.Name, "file", f.info.Name, "by", cover.info.Name)
			continue
		}
		kept = append(kept, f)
	}
	return kept, nil
}

// badFile is an LTX file whose header or trailer does not read.
type badFile struct {
	name string
	err  error
}

// quarantineBad moves unreadable files that come after every readable one
// (a torn last append) aside, and returns the files that stay. An
// unreadable file anywhere else is an error, unless every file after it
// may be unsynced (see MayBeUnsynced): then it goes aside with all of
// them.
func (l *Log) quarantineBad(files []*logFile, bad []badFile) ([]*logFile, error) {
	if len(bad) == 0 {
		return files, nil
	}
	first := bad[0]
	firstMin, _, _ := ParseName(first.name)
	for _, b := range bad[1:] {
		if min, _, _ := ParseName(b.name); min < firstMin {
			first, firstMin = b, min
		}
	}
	keep := len(files)
	for keep > 0 && files[keep-1].info.Header.MinTXID > firstMin {
		keep--
	}
	if keep < len(files) {
		later := files[keep:]
		if l.MayBeUnsynced == nil || !allFiles(later, func(f *logFile) bool { return l.MayBeUnsynced(f.info.Header) }) {
			return nil, fmt.Errorf("log %s: %w; it is not the last file, so the log cannot continue past it: "+
				"restore the file from a replica or a backup, or move it and every later file out of the directory", l.Dir, first.err)
		}
		l.Logger.Warn("an LTX file written since the log's last fsync does not read, though later ones do: a power failure? "+
			"It and every later file are moved aside; their transactions are written again from the WAL",
			"db", l.Name, "file", first.name, "err", first.err, "later_files", len(later))
		for _, f := range later {
			if err := l.quarantine(f.info.Name, "it follows a file that does not read"); err != nil {
				return nil, err
			}
		}
		files = files[:keep]
	}
	for _, b := range bad {
		if err := l.quarantine(b.name, "it does not read"); err != nil {
			return nil, err
		}
	}
	return files, nil
}

// allFiles reports whether ok holds for every file of files.
func allFiles(files []*logFile, ok func(*logFile) bool) bool {
	return !slices.ContainsFunc(files, func(f *logFile) bool { return !ok(f) })
}

// checkChain checks that each file starts where the previous one ended.
func (l *Log) checkChain(files []*logFile) error {
	for i := 1; i < len(files); i++ {
		prev, f := &files[i-1].info, &files[i].info
		if f.Header.MinTXID != prev.Header.MaxTXID+1 {
			return fmt.Errorf("log %s: gap in TXIDs: %s ends at txid %s but the next file, %s, starts at %s: "+
				"restore the missing files, or move the files before the gap out of the directory to keep only the later history",
				l.Dir, prev.Name, prev.Header.MaxTXID, f.Name, f.Header.MinTXID)
		}
		if f.Header.PreApplyChecksum != prev.PostApplyChecksum {
			return fmt.Errorf("log %s: %s leaves checksum %s but %s applies at checksum %s: the files are from different histories; "+
				"move the files that do not belong out of the directory", l.Dir, prev.Name, prev.PostApplyChecksum, f.Name, f.Header.PreApplyChecksum)
		}
	}
	return nil
}

// verifyEntry decodes f, a file in a segment, in full, checking its seal.
func (l *Log) verifyEntry(f *logFile) error {
	fh, err := l.open(f)
	if err != nil {
		return err
	}
	defer func() { _ = fh.Close() }()
	if _, err := io.Copy(io.Discard, NewVerifyReader(fh, f.info.Seal)); err != nil {
		return fmt.Errorf("verify %s in segment %s at offset %d: %w", f.info.Name, l.path(f.seg.name), f.off, err)
	}
	return nil
}

// verifyLast decodes the last file in full, and seals it if it has no seal;
// while it fails to verify, it is moved aside and the one before it is
// checked.
func (l *Log) verifyLast(files []*logFile) ([]*logFile, error) {
	for len(files) > 0 {
		last := files[len(files)-1]
		if last.seg != nil {
			err := l.verifyEntry(last)
			if err == nil {
				return files, nil
			} else if !errors.Is(err, ErrCorrupt) {
				return nil, err
			}
			l.Logger.Warn("last file in the log does not verify", "db", l.Name, "file", last.info.Name,
				"segment", last.seg.name, "offset", last.off, "err", err)
			st, err := os.Stat(l.path(last.seg.name))
			if err != nil {
				return nil, err
			}
			n := int(last.info.Header.MinTXID - last.seg.first)
			if err := l.cutSegment(last.seg, n, last.off, st.Size(), true); err != nil {
				return nil, err
			}
			last.seg.live.Add(-1)
			files = files[:len(files)-1]
			continue
		}
		_, seal, err := verifyFile(l.path(last.info.Name))
		if err == nil {
			return files, l.seal(last, seal)
		} else if !errors.Is(err, ErrCorrupt) {
			return nil, err
		}
		l.Logger.Warn("last file in the log does not verify", "db", l.Name, "file", last.info.Name, "err", err)
		if err := l.quarantine(last.info.Name, "it does not verify"); err != nil {
			return nil, err
		}
		files = files[:len(files)-1]
	}
	return files, nil
}

// sealAll verifies and seals the files before the last (verifyLast did
// the last) that have no seal (see seal.go): files copied in without their
// extended attributes.
func (l *Log) sealAll(files []*logFile) error {
	for _, f := range files[:max(len(files)-1, 0)] {
		if f.info.Seal != 0 || f.seg != nil {
			continue
		}
		_, seal, err := verifyFile(l.path(f.info.Name))
		if err != nil {
			return fmt.Errorf("log %s: %w", l.Dir, err)
		}
		if err := l.seal(f, seal); err != nil {
			return err
		}
	}
	return nil
}

// seal stores seal, computed from f's bytes as they verified, on f's file
// if it has none.
func (l *Log) seal(f *logFile, seal Checksum) error {
	if f.info.Seal != 0 {
		return nil
	}
	path := l.path(f.info.Name)
	fh, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = fh.Close() }()
	if err := writeSeal(fh, seal); err != nil {
		return fmt.Errorf("seal %s: %w", path, err)
	}
	if err := fh.Sync(); err != nil {
		return fmt.Errorf("seal %s: %w", path, err)
	}
	f.info.Seal, err = readSeal(fh) // stays 0 without extended attributes
	return err
}

// loadSidecars reads the position sidecars of the files that have one and
// removes sidecars without a file. A sidecar that does not read leaves its
// file's interior positions unknown; it does not stop the log.
func (l *Log) loadSidecars(files []*logFile, sidecars map[string]bool) error {
	for _, f := range files {
		name := posName(f.info.Name)
		if !sidecars[name] {
			continue
		}
		delete(sidecars, name)
		sums, err := readPositions(l.path(name), &f.info)
		if err != nil {
			l.Logger.Warn("ignoring position sidecar; readers inside the file will need a snapshot", "db", l.Name, "file", name, "err", err)
			continue
		}
		f.positions = sums
	}
	for name := range sidecars {
		// Gone already if its file was superseded and removed.
		if err := os.Remove(l.path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// quarantine moves a file out of the log into the corrupt subdirectory,
// for the reason why.
func (l *Log) quarantine(name, why string) error {
	dir := l.path(corruptDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	dst := filepath.Join(dir, name)
	if err := os.Rename(l.path(name), dst); err != nil {
		return fmt.Errorf("move torn file out of the log: %w", err)
	}
	if err := syncDirectory(dir); err != nil {
		return err
	}
	l.Logger.Warn("moved a file at the end of the log out of it; it was never applied", "db", l.Name, "file", name, "why", why, "kept_as", dst)
	return nil
}

// removeFile removes an LTX file and its sidecar, if any. The file becomes
// a spare if nobody reads it. Caller has taken f out of l.files.
func (l *Log) removeFile(f *logFile) error {
	if s := f.seg; s != nil {
		if s.live.Add(-1) == 0 && !s.active.Load() {
			return l.removeSegment(s)
		}
		return nil
	}
	name := f.info.Name
	spares := l.Spares
	if f.readers.Load() > 0 {
		spares = nil
	}
	if err := spares.Put(l.path(name)); err != nil {
		return err
	}
	if err := os.Remove(l.path(posName(name))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// openDatabase builds the checksum table of the database and checks it
// against the log, or starts the log from the database if the log is empty.
func (l *Log) openDatabase(ctx context.Context) error {
	var t *ChecksumTable
	var err error
	if l.DB != nil {
		t, err = ReadChecksumTableFrom(ctx, l.DBPath, l.DB)
	} else {
		t, err = ReadChecksumTable(l.DBPath)
	}
	if err != nil {
		return err
	}
	l.table = t
	if len(l.files) == 0 {
		if t.Pages() == 0 {
			return nil
		}
		return l.bootstrap(ctx)
	}
	last := l.files[len(l.files)-1].info
	if t.Checksum() != last.PostApplyChecksum || t.Pages() != last.Header.Commit {
		if ok, err := l.rollForward(ctx, t); err != nil {
			return err
		} else if ok {
			return nil
		}
		return &DatabaseMismatchError{DB: l.Name, Path: l.DBPath, Dir: l.Dir, Log: last.Pos(), Checksum: t.Checksum(), Pages: t.Pages()}
	}
	return nil
}

// bootstrap records the existing database as a snapshot at TXID 1.
func (l *Log) bootstrap(ctx context.Context) error {
	var db io.ReaderAt = l.DB
	if l.DB == nil {
		f, err := os.Open(l.DBPath)
		if err != nil {
			return err
		}
		defer func() { _ = f.Close() }()
		db = f
	}
	w, err := l.writeTx(ctx, Tx{DB: db, PageSize: l.table.PageSize(), Commit: l.table.Pages()}, Pos{}, l.table)
	if err == nil {
		if err = w.out.rename(true); err != nil {
			w.out.remove()
		}
	}
	if err != nil {
		return fmt.Errorf("start log from existing database: %w", err)
	}
	info := l.install(w)
	l.Logger.Info("started the log from the existing database", "db", l.Name, "pos", info.Pos(), "pages", info.Header.Commit)
	return nil
}
