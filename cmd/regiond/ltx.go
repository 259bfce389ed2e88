package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	codec "github.com/superfly/ltx"

	"github.com/meridian-db/meridian/ltx"
)

const ltxUsage = `Inspect, verify and restore LTX logs and database files.

Usage:

	regiond ltx ls [-json] DIR          list the LTX files of a log directory
	regiond ltx dump [-hex] FILE        print an LTX file: header, pages, checksums
	regiond ltx verify FILE|DIR...      verify files, or whole log directories
	regiond ltx checksum DBFILE         compute the LTX checksum of a database file
	regiond ltx restore -o DBFILE DIR|FILE...
	                                    rebuild a database from a snapshot and later files
	regiond ltx export [-from TXID] [-to TXID] DIR OUTDIR
	                                    write the log's files, verified, one LTX file each

Every command only reads its inputs; restore writes only DBFILE. A command
that finds corruption says where and exits with status 1.
`

func runLTX(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, ltxUsage)
		return flag.ErrHelp
	}
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"ls":       ltxLs,
		"dump":     ltxDump,
		"verify":   ltxVerify,
		"checksum": ltxChecksum,
		"restore":  ltxRestore,
		"export":   ltxExport,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		if args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
			fmt.Fprint(stdout, ltxUsage)
			return nil
		}
		return usagef("unknown ltx command %q; run \"regiond ltx help\" for the list", args[0])
	}
	return cmd(ctx, args[1:], stdout, stderr)
}

// newFlagSet returns a flag set for "regiond ltx NAME" printing usage to
// stderr.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("regiond ltx "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: regiond ltx %s %s\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func ltxLs(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("ls", "[-json] DIR", stderr)
	asJSON := fs.Bool("json", false, "print one JSON object per file")
	if err := fs.Parse(args); err != nil {
		return err
	} else if fs.NArg() != 1 {
		return usagef("ltx ls: want one log directory, got %d arguments", fs.NArg())
	}
	dir := fs.Arg(0)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}

	var bad int
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	if !*asJSON {
		fmt.Fprintln(tw, "FILE\tPAGE SIZE\tCOMMIT\tPRE-APPLY\tPOST-APPLY\tTIMESTAMP\tSIZE")
	}
	enc := json.NewEncoder(stdout)
	var infos []*ltx.FileInfo
	for _, e := range entries {
		switch {
		case e.IsDir():
		case strings.HasSuffix(e.Name(), ".ltx"):
			info, err := ltx.ReadFileInfo(filepath.Join(dir, e.Name()))
			if err != nil {
				bad++
				fmt.Fprintf(stderr, "%s\n", err)
				continue
			}
			infos = append(infos, info)
		case strings.HasSuffix(e.Name(), ".segment"):
			rep, err := ltx.ReadSegment(filepath.Join(dir, e.Name()))
			if err == nil {
				err = rep.Bad
			}
			if err != nil {
				bad++
				fmt.Fprintf(stderr, "%s\n", err)
			}
			if rep != nil {
				for _, e := range rep.Entries {
					infos = append(infos, &e.FileInfo)
				}
			}
		}
	}
	slices.SortStableFunc(infos, func(a, b *ltx.FileInfo) int { return cmp.Compare(a.Header.MinTXID, b.Header.MinTXID) })
	for _, info := range infos {
		if *asJSON {
			if err := enc.Encode(fileJSON(info)); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%d\n", info.Name, info.Header.PageSize, info.Header.Commit,
			info.PreApplyPos(), info.Pos(), info.Time().Format(codec.RFC3339Milli), info.Size)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if bad > 0 {
		return fmt.Errorf("%d files could not be read", bad)
	}
	return nil
}

// fileJSON is the JSON form of a file in `ltx ls -json`.
func fileJSON(info *ltx.FileInfo) any {
	return struct {
		Name      string    `json:"name"`
		MinTXID   ltx.TXID  `json:"min_txid"`
		MaxTXID   ltx.TXID  `json:"max_txid"`
		PageSize  uint32    `json:"page_size"`
		Commit    uint32    `json:"commit"`
		PreApply  string    `json:"pre_apply_pos"`
		PostApply string    `json:"post_apply_pos"`
		FileCRC   string    `json:"file_checksum"`
		Timestamp time.Time `json:"timestamp"`
		Size      int64     `json:"size"`
	}{info.Name, info.Header.MinTXID, info.Header.MaxTXID, info.Header.PageSize, info.Header.Commit,
		info.PreApplyPos().String(), info.Pos().String(), info.FileChecksum.String(), info.Time(), info.Size}
}

func ltxDump(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("dump", "[-hex] FILE", stderr)
	withHex := fs.Bool("hex", false, "also print each page's bytes as a hex dump")
	if err := fs.Parse(args); err != nil {
		return err
	} else if fs.NArg() != 1 {
		return usagef("ltx dump: want one LTX file, got %d arguments", fs.NArg())
	}
	path := fs.Arg(0)
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()

	w := bufio.NewWriter(stdout)
	defer func() { _ = w.Flush() }()
	dec := ltx.NewDecoder(f)
	if err := dec.DecodeHeader(); err != nil {
		return fmt.Errorf("%s: %w: header: %v", path, ltx.ErrCorrupt, err)
	}
	hdr := dec.Header()
	fmt.Fprintf(w, "file:        %s\n", path)
	fmt.Fprintf(w, "version:     %d\n", hdr.Version)
	fmt.Fprintf(w, "flags:       0x%08x\n", hdr.Flags)
	fmt.Fprintf(w, "page size:   %d\n", hdr.PageSize)
	fmt.Fprintf(w, "commit:      %d pages\n", hdr.Commit)
	fmt.Fprintf(w, "txid:        %s-%s\n", hdr.MinTXID, hdr.MaxTXID)
	fmt.Fprintf(w, "snapshot:    %t\n", hdr.IsSnapshot())
	fmt.Fprintf(w, "timestamp:   %s\n", time.UnixMilli(hdr.Timestamp).UTC().Format(codec.RFC3339Milli))
	fmt.Fprintf(w, "pre-apply:   %s\n", hdr.PreApplyPos())
	fmt.Fprintf(w, "wal:         offset %d, size %d, salts %08x %08x\n", hdr.WALOffset, hdr.WALSize, hdr.WALSalt1, hdr.WALSalt2)
	fmt.Fprintf(w, "node id:     %d\n", hdr.NodeID)
	fmt.Fprintf(w, "\n%-10s  %s\n", "PAGE", "PAGE CHECKSUM")

	var ph codec.PageHeader
	data := make([]byte, hdr.PageSize)
	sum := ltx.ChecksumFlag
	for n := 1; ; n++ {
		if err := dec.DecodePage(&ph, data); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			_ = w.Flush()
			return fmt.Errorf("%s: %w: page frame %d: %v", path, ltx.ErrCorrupt, n, err)
		}
		pageSum := codec.ChecksumPage(ph.Pgno, data)
		sum ^= pageSum
		fmt.Fprintf(w, "%-10d  %s\n", ph.Pgno, pageSum)
		if *withHex {
			fmt.Fprint(w, hex.Dump(data))
		}
	}
	if err := dec.Close(); err != nil {
		_ = w.Flush()
		return fmt.Errorf("%s: %w: %v", path, ltx.ErrCorrupt, err)
	}
	t := dec.Trailer()
	fmt.Fprintf(w, "\npages:       %d\n", dec.PageN())
	fmt.Fprintf(w, "post-apply:  %s\n", dec.PostApplyPos())
	fmt.Fprintf(w, "file crc:    %s (matches)\n", t.FileChecksum)
	if hdr.IsSnapshot() {
		fmt.Fprintf(w, "db checksum: %s computed from the pages\n", ltx.ChecksumFlag|sum)
	}
	_ = w.Flush()
	// The full check, including what the codec leaves to its callers.
	if _, err := ltx.VerifyFile(path); err != nil {
		return err
	}
	return nil
}

func ltxVerify(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("verify", "FILE|DIR...", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	} else if fs.NArg() == 0 {
		return usagef("ltx verify: want LTX files or log directories")
	}
	var failed int
	for _, path := range fs.Args() {
		fi, err := os.Stat(path)
		if err != nil {
			failed++
			fmt.Fprintln(stderr, err)
			continue
		}
		if !fi.IsDir() {
			info, err := ltx.VerifyFile(path)
			if err != nil {
				failed++
				fmt.Fprintln(stderr, err)
				continue
			}
			sealed := "sealed"
			if info.Seal == 0 {
				sealed = "not sealed: checked by decoding only"
			}
			fmt.Fprintf(stdout, "%s: ok, txid %s-%s, %s -> %s (%s)\n", path, info.Header.MinTXID, info.Header.MaxTXID, info.PreApplyPos(), info.Pos(), sealed)
			continue
		}
		r, err := ltx.VerifyDir(path)
		if err != nil {
			failed++
			fmt.Fprintln(stderr, err)
			continue
		}
		for _, note := range r.Notes {
			fmt.Fprintf(stdout, "%s: note: %s\n", path, note)
		}
		for _, p := range r.Problems {
			fmt.Fprintf(stderr, "%s: %s\n", path, p)
		}
		if !r.OK() {
			failed++
			continue
		}
		if len(r.Files) == 0 {
			fmt.Fprintf(stdout, "%s: ok, empty log\n", path)
			continue
		}
		first, last := r.Files[0], r.Files[len(r.Files)-1]
		fmt.Fprintf(stdout, "%s: ok, %d files, txid %s-%s, from %s to %s\n", path, len(r.Files),
			first.Header.MinTXID, last.Header.MaxTXID, first.PreApplyPos(), last.Pos())
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d inputs failed verification", failed, fs.NArg())
	}
	return nil
}

func ltxChecksum(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("checksum", "DBFILE", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	} else if fs.NArg() != 1 {
		return usagef("ltx checksum: want one database file, got %d arguments", fs.NArg())
	}
	path := fs.Arg(0)
	if _, err := os.Stat(path); err != nil {
		return err
	}
	start := time.Now()
	t, err := ltx.ReadChecksumTable(path)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: checksum %s, %d pages of %d bytes (%s)\n", path, t.Checksum(), t.Pages(), t.PageSize(), time.Since(start).Round(time.Microsecond))
	return nil
}

func ltxRestore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("restore", "-o DBFILE DIR|FILE...", stderr)
	out := fs.String("o", "", "database file to write (required)")
	force := fs.Bool("f", false, "replace DBFILE if it exists")
	if err := fs.Parse(args); err != nil {
		return err
	} else if *out == "" {
		return usagef("ltx restore: -o DBFILE is required")
	} else if fs.NArg() == 0 {
		return usagef("ltx restore: want a log directory, or a snapshot and later LTX files")
	}
	if _, err := os.Stat(*out); err == nil && !*force {
		return fmt.Errorf("%s exists; pass -f to replace it", *out)
	}

	var stored []ltx.Stored
	if fi, err := os.Stat(fs.Arg(0)); err == nil && fi.IsDir() {
		if fs.NArg() != 1 {
			return usagef("ltx restore: give one log directory, or LTX files")
		}
		r, err := ltx.VerifyDir(fs.Arg(0))
		if err != nil {
			return err
		} else if !r.OK() {
			return fmt.Errorf("log %s does not verify: %w", fs.Arg(0), r.Err())
		}
		stored = r.Stored
	} else {
		for _, p := range fs.Args() {
			stored = append(stored, ltx.Stored{Name: filepath.Base(p), Path: p})
		}
	}
	paths := stored
	if len(paths) == 0 {
		return fmt.Errorf("nothing to restore: %s is an empty log", fs.Arg(0))
	}

	var rdrs []io.Reader
	for _, st := range stored {
		f, err := ltx.OpenStored(st)
		if err != nil {
			return err
		}
		defer func() { _ = f.Close() }()
		rdrs = append(rdrs, f)
	}
	pos, err := ltx.Restore(ctx, *out, rdrs...)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: restored to %s from %d files\n", *out, pos, len(paths))
	return nil
}

// ltxExport writes the files of a log directory, whether each is a file of
// its own or part of a segment, as LTX files of their own, each verified
// as it is copied.
func ltxExport(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("export", "[-from TXID] [-to TXID] DIR OUTDIR", stderr)
	from := fs.Uint64("from", 0, "export only files that end at or after this TXID")
	to := fs.Uint64("to", 0, "export only files that begin at or before this TXID (0: no bound)")
	if err := fs.Parse(args); err != nil {
		return err
	} else if fs.NArg() != 2 {
		return usagef("ltx export: want a log directory and an output directory, got %d arguments", fs.NArg())
	}
	r, err := ltx.VerifyDir(fs.Arg(0))
	if err != nil {
		return err
	} else if !r.OK() {
		return fmt.Errorf("log %s does not verify: %w", fs.Arg(0), r.Err())
	}
	if err := os.MkdirAll(fs.Arg(1), 0o755); err != nil {
		return err
	}
	n := 0
	for i, info := range r.Files {
		if uint64(info.Header.MaxTXID) < *from || (*to != 0 && uint64(info.Header.MinTXID) > *to) {
			continue
		}
		if err := exportFile(r.Stored[i], info.Seal, filepath.Join(fs.Arg(1), info.Name)); err != nil {
			return err
		}
		n++
	}
	fmt.Fprintf(stdout, "exported %d files to %s\n", n, fs.Arg(1))
	return nil
}

// exportFile copies the stored file to dst, verifying it on the way.
func exportFile(st ltx.Stored, seal ltx.Checksum, dst string) error {
	src, err := ltx.OpenStored(st)
	if err != nil {
		return err
	}
	defer func() { _ = src.Close() }()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("%w (export writes new files only: empty the output directory first)", err)
	}
	if _, err = io.Copy(out, ltx.NewVerifyReader(src, seal)); err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(dst)
		return fmt.Errorf("export %s: %w", st.Name, err)
	}
	return nil
}
