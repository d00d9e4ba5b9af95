// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {GRID} from "./GRID.sol";

/// @title GridAnchor: meterproof's ledger on an EVM chain.
/// @notice Each batch is anchored once (a second submission of a batch id reverts with
///         AlreadyAnchored), in order (its header names the previous entry's hash), by the
///         oracle account the admin may rotate. The 164-byte header signed by the oracle's
///         Ed25519 key is parsed here, so the stored reading root, count and entry hash
///         are the signed ones. GRID goes to wallets directly in the anchoring transaction,
///         or is committed as an RFC 6962 claim root whose leaves anyone claims once.
///         docs/anchoring.md explains the layouts; schemas/merkle.py is the same tree.
contract GridAnchor is Ownable {
    struct Batch {
        bytes32 entryHash;
        bytes32 readingRoot;
        bytes32 claimRoot;
        uint64 epoch;
        uint64 readingCount;
        uint64 claimCount;
        uint256 claimTotal;
        uint256 claimed;
        uint256 directTotal;
    }

    /// @notice A batch's claimable GRID: `total` units over `count` leaves under `root`.
    struct ClaimTree {
        bytes32 root;
        uint64 count;
        uint256 total;
    }

    uint256 private constant HEADER_SIZE = 164;

    GRID public immutable grid;
    address public oracle;
    uint64 public head;
    bytes32 public headEntryHash;
    mapping(uint64 => Batch) private _batches;
    mapping(uint64 => mapping(uint256 => uint256)) private _claimedBits;

    event OracleRotated(address indexed previous, address indexed next);
    event Anchored(
        uint64 indexed batch,
        bytes32 entryHash,
        ClaimTree claims,
        uint256 directTotal,
        bytes header,
        bytes signature
    );
    event Claimed(
        uint64 indexed batch, uint256 index, address indexed account, uint256 amount, string meterId
    );

    error NotOracle(address sender);
    error BadHeader();
    error BadCommitment();
    error AlreadyAnchored(uint64 batch, bytes32 entryHash);
    error OutOfOrder(uint64 batch, uint64 head);
    error NotAnchored(uint64 batch);
    error AlreadyClaimed(uint64 batch, uint256 index);
    error InvalidProof();
    error NoAccount();

    modifier onlyOracle() {
        if (msg.sender != oracle) revert NotOracle(msg.sender);
        _;
    }

    constructor(address admin, address oracle_) Ownable(admin) {
        grid = new GRID(address(this));
        oracle = oracle_;
        emit OracleRotated(address(0), oracle_);
    }

    function setOracle(address next) external onlyOwner {
        emit OracleRotated(oracle, next);
        oracle = next;
    }

    /// @notice Anchor the batch the header names, exactly once and in order, and mint
    ///         `amounts[i]` to `to[i]`; the rest of its GRID is `tree.total` over the
    ///         `tree.count` leaves under `tree.root`.
    function anchor(
        bytes calldata header,
        bytes calldata signature,
        ClaimTree calldata tree,
        address[] calldata to,
        uint256[] calldata amounts
    ) external onlyOracle {
        if (to.length != amounts.length) revert BadCommitment();
        uint64 batch = _record(header, tree);
        uint256 direct;
        for (uint256 i; i < to.length; ++i) {
            grid.mint(to[i], amounts[i]);
            direct += amounts[i];
        }
        _batches[batch].directTotal = direct;
        emit Anchored(batch, headEntryHash, tree, direct, header, signature);
    }

    function _record(bytes calldata header, ClaimTree calldata tree) private returns (uint64) {
        if (header.length != HEADER_SIZE || bytes4(header[0:4]) != bytes4("MPL1")) {
            revert BadHeader();
        }
        uint64 batch = uint64(bytes8(header[4:12]));
        Batch storage b = _batches[batch];
        if (b.entryHash != 0) revert AlreadyAnchored(batch, b.entryHash);
        if (batch != head + 1 || bytes32(header[28:60]) != headEntryHash) {
            revert OutOfOrder(batch, head);
        }
        if ((tree.count == 0) != (tree.root == 0)) revert BadCommitment();
        bytes32 entryHash = sha256(header);
        b.entryHash = entryHash;
        b.readingRoot = bytes32(header[60:92]);
        b.epoch = uint64(bytes8(header[12:20]));
        b.readingCount = uint64(bytes8(header[92:100]));
        b.claimRoot = tree.root;
        b.claimCount = tree.count;
        b.claimTotal = tree.total;
        head = batch;
        headEntryHash = entryHash;
        return batch;
    }

    /// @notice Mint a claim leaf that names its wallet, to that wallet; anyone may send it.
    function claim(
        uint64 batch,
        uint256 index,
        address account,
        uint256 amount,
        string calldata meterId,
        bytes32[] calldata path
    ) external {
        if (account == address(0)) revert NoAccount();
        _spend(batch, index, account, amount, meterId, path, account);
    }

    /// @notice Mint a leaf whose meter had no EVM wallet at sealing time to the wallet
    ///         linked to that meter now: the oracle attests the current link.
    function release(
        uint64 batch,
        uint256 index,
        uint256 amount,
        string calldata meterId,
        bytes32[] calldata path,
        address to
    ) external onlyOracle {
        if (to == address(0)) revert NoAccount();
        _spend(batch, index, address(0), amount, meterId, path, to);
    }

    function _spend(
        uint64 batch,
        uint256 index,
        address account,
        uint256 amount,
        string calldata meterId,
        bytes32[] calldata path,
        address to
    ) private {
        Batch storage b = _batches[batch];
        if (b.entryHash == 0) revert NotAnchored(batch);
        uint256 word = _claimedBits[batch][index >> 8];
        uint256 bit = 1 << (index & 0xff);
        if (word & bit != 0) revert AlreadyClaimed(batch, index);
        bytes32 leaf = claimLeaf(batch, account, amount, meterId);
        if (!_included(leaf, index, b.claimCount, path, b.claimRoot)) revert InvalidProof();
        if (b.claimed + amount > b.claimTotal) revert BadCommitment();
        _claimedBits[batch][index >> 8] = word | bit;
        b.claimed += amount;
        emit Claimed(batch, index, to, amount, meterId);
        grid.mint(to, amount);
    }

    /// @notice RFC 6962 leaf hash of a claim: sha256(0x00 || batch || account || amount || meterId).
    function claimLeaf(uint64 batch, address account, uint256 amount, string calldata meterId)
        public
        pure
        returns (bytes32)
    {
        return sha256(abi.encodePacked(bytes1(0x00), batch, account, amount, meterId));
    }

    function isClaimed(uint64 batch, uint256 index) external view returns (bool) {
        return _claimedBits[batch][index >> 8] & (1 << (index & 0xff)) != 0;
    }

    function batches(uint64 batch) external view returns (Batch memory) {
        return _batches[batch];
    }

    /// @notice True when `readingHash` is leaf `index` of the anchored batch's reading tree
    ///         (RFC 6962 audit path from `meterproof ledger proof`); false otherwise.
    function verifyReading(uint64 batch, bytes32 readingHash, uint256 index, bytes32[] calldata path)
        external
        view
        returns (bool)
    {
        Batch storage b = _batches[batch];
        if (b.entryHash == 0) return false;
        bytes32 leaf = sha256(abi.encodePacked(bytes1(0x00), readingHash));
        return _included(leaf, index, b.readingCount, path, b.readingRoot);
    }

    /// @dev RFC 9162 section 2.1.3.2, as schemas/merkle.py verify_inclusion.
    function _included(
        bytes32 leaf,
        uint256 index,
        uint256 size,
        bytes32[] calldata path,
        bytes32 root
    ) private pure returns (bool) {
        if (index >= size) return false;
        uint256 fn = index;
        uint256 sn = size - 1;
        bytes32 r = leaf;
        for (uint256 i; i < path.length; ++i) {
            if (sn == 0) return false;
            if (fn & 1 == 1 || fn == sn) {
                r = sha256(abi.encodePacked(bytes1(0x01), path[i], r));
                while (fn & 1 == 0 && fn != 0) {
                    fn >>= 1;
                    sn >>= 1;
                }
            } else {
                r = sha256(abi.encodePacked(bytes1(0x01), r, path[i]));
            }
            fn >>= 1;
            sn >>= 1;
        }
        return sn == 0 && r == root;
    }
}
